"""The one exception type for problems the user can fix (bad config, missing file, ...), and how the entry points
report it."""

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn


def extra_hint(extra: str) -> str:
    """How to install one of ppo-cli's optional extras (the project installs from its folder, not an index)."""
    return f"install the '{extra}' extra: pip install \".[{extra}]\" in the ppo-cli folder"


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line, or its type's name where it has none: what a one-line error
    quotes of what went wrong underneath."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class UserError(Exception):
    """A problem the user can fix; the entry points print its message as one line and exit 2."""


@contextmanager
def one_line_errors(prog: str) -> Iterator[None]:
    """The entry points' way out for a UserError: `prog: error: <message>` as one line on stderr (a message that
    quotes a multi-line text, such as an env's own exception, is joined onto it), exit code 2."""
    try:
        yield
    except UserError as exc:
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser with its errors as one line, like every other error of the entry points (argparse's own
    print the usage first): `prog: error: <message> (see prog --help)`, exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(2)
