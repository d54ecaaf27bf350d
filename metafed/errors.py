"""Errors the command line prints on one line, defined below every component that raises them."""


class ConfigError(ValueError):
    """A configuration problem the user can fix; the CLI prints it on one line."""
