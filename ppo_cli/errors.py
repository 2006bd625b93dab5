"""The one exception type for problems the user can fix (bad config, missing file, ...)."""


def extra_hint(extra: str) -> str:
    """How to install one of ppo-cli's optional extras (the project installs from its folder, not an index)."""
    return f"install the '{extra}' extra: pip install \".[{extra}]\" in the ppo-cli folder"


class UserError(Exception):
    """A problem the user can fix; the entry points print its message as one line and exit 2."""
