"""Command-line helpers shared by the project's commands: an unknown option names the nearest one.

``argparse`` (Python 3.11) refuses an unknown option with exit code 2 but does not say which
option was meant; the bundle's ``run`` entries refuse unknown ``--name value`` settings the same
way (:func:`monai_iqt.bundle_settings.refuse_unknown_settings`). Both ask :func:`nearest` so a
misspelling is answered alike everywhere.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn


def nearest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``name`` (``difflib.get_close_matches``); None if none is close."""
    matches = difflib.get_close_matches(name, sorted(set(candidates)), n=1)
    return matches[0] if matches else None


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """The options of ``parser`` and of all its sub-commands."""
    options = set()
    for action in parser._actions:
        options.update(action.option_strings)
        if isinstance(action.choices, dict):
            for subparser in action.choices.values():
                if isinstance(subparser, argparse.ArgumentParser):
                    options |= _option_strings(subparser)
    return options


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors name the nearest known option of every unknown
    option given (argparse may first report a required option missing: the typo's intent)."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        options = _option_strings(self)
        hints = []
        for token in getattr(self, "_given", []):
            option = token.split("=", 1)[0]
            if not option.startswith("--") or any(o.startswith(option) for o in options):
                continue  # a value, a known option or an abbreviation argparse accepts
            match = nearest(option, (o for o in options if o.startswith("--")))
            if match is not None:
                hints.append(f"the nearest option to {option} is {match}")
        super().error(message + (f"; {', '.join(hints)}" if hints else ""))
