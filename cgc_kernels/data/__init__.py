"""The shipped demo tasks (`demo_tasks`) and the reader of instruction files (`reader`)."""
