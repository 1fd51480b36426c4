"""UserError: a mistake in what the user asked for (a bad file, a bad value)."""


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, never a traceback."""
