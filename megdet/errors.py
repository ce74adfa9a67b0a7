"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class MegdetError(Exception):
    """A problem with the user's input: config, data, checkpoint or command line."""


class ConfigError(MegdetError):
    """A config key is unknown, has the wrong type, or a value that cannot work."""


class DataError(MegdetError):
    """A dataset file is missing or malformed."""
