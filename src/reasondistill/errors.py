"""User-facing errors: one line naming the file, key or row and what was expected.

The CLI prints `error: <message>` for these and exits with status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import ValidationError


def dotted(location: tuple) -> str:
    return ".".join(str(part) for part in location)


class UserError(Exception):
    """A problem with the user's input (recipe, dataset, model path, run directory)."""


def describe_validation_error(err: ValidationError, where: str, key: Callable[[tuple], str] = dotted) -> str:
    """Turn the first error of a pydantic ValidationError into `where: key.path: what was expected`."""
    # An unknown key is usually the cause of the other errors (a typo'd key is also a missing one).
    errors = sorted(err.errors(include_url=False), key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    location = key(first["loc"]) if first["loc"] else ""
    if first["type"] == "extra_forbidden":
        what = "unknown key"
    elif first["type"] == "missing":
        what = "missing required key"
    else:
        what = f"{first['msg']} (got {first.get('input')!r})"
    more = len(errors) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{where}: {location}: {what}{suffix}" if location else f"{where}: {what}{suffix}"
