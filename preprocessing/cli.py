"""Command-line helpers shared by the project's commands: an unknown option names the nearest one.

``argparse`` (Python 3.11) refuses an unknown option with exit code 2 but does not say which
option was meant; the bundle's ``run`` entries refuse unknown ``--name value`` settings the same
way (:func:`monai_iqt.bundle.refuse_unknown_settings`). Both ask :func:`nearest` so a misspelling
is answered alike everywhere.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterable, Sequence
from typing import Any


def nearest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``name`` (``difflib.get_close_matches``); None if none is close."""
    matches = difflib.get_close_matches(name, sorted(set(candidates)), n=1)
    return matches[0] if matches else None


def _option_strings(parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> set[str]:
    """The options of ``parser`` and of the sub-command the namespace chose, if any."""
    options = {option for action in parser._actions for option in action.option_strings}
    for action in parser._actions:
        chosen = getattr(namespace, action.dest, None) if action.dest else None
        if isinstance(action.choices, dict) and isinstance(chosen, str):
            subparser = action.choices.get(chosen)
            if isinstance(subparser, argparse.ArgumentParser):
                options |= _option_strings(subparser, namespace)
    return options


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose unknown-option error names the nearest known option."""

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> argparse.Namespace:
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            options = _option_strings(self, parsed)
            hints = []
            for token in unknown:
                if token.startswith("-") and len(token) > 1:
                    option = token.split("=", 1)[0]
                    match = nearest(option, (o for o in options if o.startswith("--")))
                    if match is not None:
                        hints.append(f"the nearest option to {option} is {match}")
            hint = f"; {', '.join(hints)}" if hints else ""
            self.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
        return parsed
