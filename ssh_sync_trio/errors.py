"""Errors that stop the server at start, whichever layer finds them."""


class StartupError(Exception):
    """The node cannot start: a dependency is unreachable or misconfigured."""
