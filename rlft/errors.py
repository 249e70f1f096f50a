"""The one exception type for user mistakes (bad flag, missing file, malformed data).

The CLI prints its message as a single line and exits with status 2, instead of a traceback.
"""


class RlftError(Exception):
    """A user-facing error whose message names the bad field, flag or file."""
