"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class MegdetError(Exception):
    """A problem with the user's input: config, data, checkpoint or command line."""


class ConfigError(MegdetError):
    """A config key is unknown, has the wrong type, or a value that cannot work."""


class DataError(MegdetError):
    """A dataset file is missing or malformed."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception from a library as one line of ours: its type and the first line of its
    message, cut at ``limit`` characters (torch's can run to paragraphs)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    message = lines[0] if lines else ""
    if len(message) > limit:
        message = message[: limit - 3] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
