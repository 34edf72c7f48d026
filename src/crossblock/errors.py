"""The one exception type users see: a bad input, explained in one line."""


class CrossblockError(Exception):
    """Raised for bad user input; the CLI prints it as one line and exits with code 2."""
