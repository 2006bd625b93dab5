"""The one exception type for problems the user can fix (bad config, missing file, ...)."""


class UserError(Exception):
    """A problem the user can fix; the entry points print its message as one line and exit 2."""
