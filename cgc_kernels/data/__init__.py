"""The data layer: data files in any accepted format and file type (`formats`, through Hugging
Face `datasets`), rows to training tokens (`encode`), UserError (`reader`), the shipped demo and
suite tasks."""
