"""The one exception type for mistakes a user can fix: bad arguments, bad data, bad files."""


class HeadstartError(Exception):
    """A user-facing error whose message is a single line that says what to fix."""


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
