"""The command-line boundary of the bundle's ``run`` entries: flags, and bad input as exit 2.

``python -m monai.bundle run`` evaluates config expressions; an entry wrapped with
:func:`exit_on_bad_input` turns the project's :class:`~preprocessing.io.InputError` (one sentence
naming the file or setting) into that sentence on stderr and exit code 2, wherever the error was
raised, including inside MONAI's config parser or dataset wrappers, which re-raise it as the
cause of their own exceptions.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from preprocessing.io import InputError

#: Exit code of every project command on bad input (as ``python -m preprocessing``).
EXIT_BAD_INPUT = 2

T = TypeVar("T")


def as_bool(value: bool | str | int) -> bool:
    """A command-line flag as a bool: ``--memory_efficient false`` reaches the config as the
    string ``"false"`` (fire only converts Python literals such as ``False``)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "none", ""):
        return False
    raise InputError(f"expected true or false, got {value!r}.")


def input_error_cause(error: BaseException | None) -> InputError | None:
    """The :class:`InputError` behind ``error`` (itself, or along its cause/context chain)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, InputError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def exit_on_bad_input(function: Callable[..., T]) -> Callable[..., T]:
    """Wrap a bundle entry: bad input prints ``error: <sentence>`` and exits with code 2."""

    @functools.wraps(function)
    def entry(*args: Any, **kwargs: Any) -> T:
        try:
            return function(*args, **kwargs)
        except Exception as error:
            cause = input_error_cause(error)
            if cause is None:
                raise
            print(f"error: {cause}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_BAD_INPUT) from None

    return entry
