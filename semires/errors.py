"""The one exception type that reaches a user as a message instead of a traceback."""


class SemiresError(Exception):
    """Bad input: a missing or malformed file, a wrong value.

    The message names the file, key or value at fault and says what to do about it. The
    command line prints it on one line and exits with a non-zero status.
    """


class CollectiveError(SemiresError):
    """A :class:`SemiresError` that every process of a distributed run raises at once, with
    the same message (the ranks agreed on it): the first process alone prints it."""
