"""The one exception type that reaches a user as a message instead of a traceback."""


class SemiresError(Exception):
    """Bad input: a missing or malformed file, a wrong value.

    The message names the file, key or value at fault and says what to do about it. The
    command line prints it on one line and exits with a non-zero status.
    """


class CollectiveError(SemiresError):
    """A :class:`SemiresError` that every process of a distributed run raises at once, with
    the same message (the ranks agreed on it): the first process alone prints it."""


class InvalidSetting(ValueError):
    """A library configuration object refused one of its values: ``key`` (the field),
    ``value`` and what is ``expected``. The params reader turns it into a
    :class:`SemiresError` naming the params key, so a config class can be a params section
    itself and each check is written once."""

    def __init__(self, key: str, value: object, expected: str) -> None:
        super().__init__(f"{key} = {value!r}: {expected}")
        self.key, self.value, self.expected = key, value, expected
