"""Errors that stop the server at start, whichever layer finds them."""


class StartupError(Exception):
    """The node cannot start: a dependency is unreachable or misconfigured."""


def first_line(error: BaseException | None) -> str:
    """An error's message cut to its first line, for a one-line log entry.

    libpq, for one, adds hints on further lines.
    """
    text = str(error or "").strip()
    return text.splitlines()[0] if text else type(error).__name__
