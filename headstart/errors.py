"""The one exception type for mistakes a user can fix: bad arguments, bad data, bad files."""


class HeadstartError(Exception):
    """A user-facing error whose message is a single line that says what to fix."""
