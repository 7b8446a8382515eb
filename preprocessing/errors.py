"""Bad input, the ground floor of both packages: the error, its one-sentence exit, setting parsing.

Every check of user input raises :class:`InputError` with one sentence naming the file or the
setting and the problem. Commands turn it into ``error: <sentence>`` on stderr and exit code
:data:`EXIT_BAD_INPUT` (``python -m preprocessing`` in its ``main``, the bundle's ``run`` entries
through :func:`exit_on_bad_input`, which also finds the error when MONAI's config parser or
dataset wrappers re-raise it as the cause of their own exceptions). Nothing here imports
anything of the project, so every module may import it.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

#: Exit code of every project command on bad input.
EXIT_BAD_INPUT = 2

T = TypeVar("T")


class InputError(ValueError):
    """Bad user input: the message is one sentence naming the file and the problem."""


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


def choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else one sentence naming the setting."""
    if value not in choices:
        raise InputError(f"setting {name} must be one of {', '.join(choices)}, got {value!r}.")
    return value


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
    """Wrap a command's entry: bad input prints ``error: <sentence>`` and exits with code 2."""

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
