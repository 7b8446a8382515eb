"""The settings a bundle command accepts: an unknown ``--name`` is refused before anything runs.

``python -m monai.bundle run`` turns every ``--name value`` into a config entry whether or not
the config reads it, so a misspelt setting would silently leave the default in force. Every
config's ``initialize`` (which MONAI evaluates before ``run``) starts with
:func:`refuse_unknown_settings`, which compares the names the command line gave with the ids
the config files declare, before anything is read or written. :func:`config_settings` tells the
settings (what ``docs/settings.md`` lists) from the wiring.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from preprocessing.cli import nearest
from preprocessing.errors import InputError, exit_on_bad_input

#: The ids MONAI's config workflow evaluates itself: wiring, not settings.
WORKFLOW_IDS = ("imports", "initialize", "run", "finalize")

#: Where each config's settings are documented (relative to the bundle root).
SETTINGS_DOCS = "docs/settings.md"


def _root_id(config_id: str) -> str:
    """``train#sampler#rank`` -> ``train``; ``+imports`` -> ``imports`` (MONAI's merge key)."""
    from monai.bundle.reference_resolver import ReferenceResolver
    from monai.bundle.utils import MERGE_KEY

    return ReferenceResolver.split_id(str(config_id).removeprefix(MERGE_KEY))[0]


def _references(value: Any) -> set[str]:
    """Root ids ``value`` refers to with ``@`` (in references and ``$`` expressions)."""
    from monai.bundle.reference_resolver import ReferenceResolver

    if isinstance(value, str):
        return {_root_id(ref) for ref in ReferenceResolver.match_refs_pattern(value)}
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return set().union(*(_references(item) for item in value))
    return set()


def _holds_component(value: Any) -> bool:
    """Whether ``value`` is or contains a ``_target_`` component."""
    if isinstance(value, Mapping):
        return "_target_" in value or any(_holds_component(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_holds_component(v) for v in value)
    return False


def config_settings(config: Mapping[str, Any]) -> list[str]:
    """The settings among a config's top-level ids, in their order (the rule of settings.md).

    A setting is a top-level id other than MONAI's workflow ids whose value holds no component
    and refers to no id but ``bundle_root``; everything else (components, the expressions that
    build them from settings, ``imports``, ``run``) is wiring.
    """
    settings = []
    for key, value in config.items():
        config_id = str(key).removeprefix("+")
        if config_id in WORKFLOW_IDS or config_id != _root_id(config_id):
            continue
        if not _holds_component(value) and _references(value) <= {"bundle_root"}:
            settings.append(config_id)
    return settings


def load_configs(config_files: Any) -> dict[str, Any]:
    """The config files merged as ``python -m monai.bundle run`` merges them."""
    from monai.bundle import ConfigParser

    return ConfigParser.load_config_files(config_files)


def declared_ids(config: Mapping[str, Any]) -> set[str]:
    """Every top-level id a (merged) config declares: its settings and its wiring."""
    return {_root_id(key) for key in config}


def monai_run_arguments() -> set[str]:
    """The arguments ``python -m monai.bundle run`` (or ``run_workflow``) takes for itself
    rather than as config overrides: the named parameters of MONAI's entry points."""
    from monai.bundle import ConfigWorkflow, scripts

    names = set()
    for function in (
        scripts.run,
        scripts.run_workflow,
        scripts.create_workflow,
        ConfigWorkflow.__init__,
    ):
        for parameter in inspect.signature(function).parameters.values():
            if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
                names.add(parameter.name)
    names.discard("self")
    return names


def _is_flag(token: str) -> bool:
    """As python-fire decides: a leading hyphen, unless the token is a negative number."""
    if token.startswith("--"):
        return True
    return len(token) > 1 and token[0] == "-" and token[1].isalpha()


def command_line_arguments(argv: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """``argv`` of ``python -m monai.bundle <command> ...`` as python-fire reads it: the command
    and each argument by name (``--name value``, ``--name=value``, a bare ``--flag``, and
    positional values by the command's parameter order), values parsed as fire parses them."""
    from fire.parser import DefaultParseValue, SeparateFlagArgs
    from monai.bundle import scripts

    arguments, _ = SeparateFlagArgs(list(argv))  # after a lone "--": fire's own flags
    if not arguments:
        return "", {}
    command, tokens = arguments[0], arguments[1:]
    entry = getattr(scripts, command, None)
    positional_names = [
        p.name
        for p in (inspect.signature(entry).parameters.values() if callable(entry) else ())
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    named: dict[str, Any] = {}
    positional = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if _is_flag(token):
            key, equals, value = token.lstrip("-").partition("=")
            if not equals:
                has_value = index + 1 < len(tokens) and not _is_flag(tokens[index + 1])
                value = tokens[index + 1] if has_value else "True"
                index += has_value
            named[key.replace("-", "_")] = DefaultParseValue(value)
        else:
            positional.append(DefaultParseValue(token))
        index += 1
    free = [name for name in positional_names if name not in named]
    named.update(zip(free, positional, strict=False))
    return command, named


def _is_bundle_run() -> bool:
    """Whether this process is ``python -m monai.bundle run`` (or ``run_workflow``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return (
        getattr(spec, "name", None) == "monai.bundle.__main__"
        and len(sys.argv) > 1
        and sys.argv[1] in ("run", "run_workflow")
    )


def _tracking_ids(tracking: Any) -> set[str]:
    """The ids MONAI's experiment tracking adds to the config (``--tracking mlflow``)."""
    from monai.bundle import ConfigParser
    from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

    if tracking in (None, "", False):
        return set()
    if isinstance(tracking, str) and tracking in DEFAULT_EXP_MGMT_SETTINGS:
        settings = DEFAULT_EXP_MGMT_SETTINGS[tracking]
    else:
        settings = ConfigParser.load_config_files(tracking)
    return {_root_id(key) for key in settings.get("configs", {})}


def _names(config_files: Any) -> str:
    from monai.utils import ensure_tuple

    if isinstance(config_files, str) and not Path(config_files).is_file():
        config_files = config_files.split(",")
    names = [str(name) for name in ensure_tuple(config_files)]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def unknown_settings_sentence(
    unknown: Sequence[str], accepted: Iterable[str], config_files: Any
) -> str:
    """One sentence naming each unknown id, the configs it was given to and the nearest id."""
    accepted = sorted(set(accepted) - {"_meta_"})
    matches = {name: nearest(name, accepted) for name in unknown}
    given = f"given to {_names(config_files)}"
    listed = f"the bundle's {SETTINGS_DOCS} lists every setting."
    if len(unknown) == 1:
        name, match = unknown[0], matches[unknown[0]]
        hint = f"the nearest setting is --{match}" if match else "no setting has a similar name"
        return f"unknown setting --{name} {given}: {hint}; {listed}"
    parts = [
        f"--{name} (nearest: --{match})" if match else f"--{name} (no similar setting)"
        for name, match in matches.items()
    ]
    return f"unknown settings {', '.join(parts)} {given}; {listed}"


@exit_on_bad_input
def refuse_unknown_settings(argv: Sequence[str] | None = None) -> None:
    """Refuse a ``--name value`` that names no id of the config files (one sentence, exit 2).

    The first step of every bundle ``run`` entry. The names come from the command line
    (``sys.argv``, as MONAI's python-fire reads it) and from ``--args_file``; MONAI's own
    arguments (``config_file``, ``meta_file``, ``args_file``, ``tracking``, ...) and overrides
    inside a declared id (``--network_def#num_blocks 2``) are accepted. Outside a
    ``python -m monai.bundle run`` process (``monai.bundle.run(...)`` called from Python) there
    is no command line to check and nothing is done.
    """
    if argv is None:
        if not _is_bundle_run():
            return
        argv = sys.argv[1:]
    command, arguments = command_line_arguments(argv)
    if command not in ("run", "run_workflow"):
        return
    if arguments.get("args_file") is not None:  # its entries are defaults of the command line
        from monai.bundle import ConfigParser

        arguments = {**ConfigParser.load_config_file(arguments["args_file"]), **arguments}
    config_files = arguments.get("config_file")
    if config_files is None:
        return  # MONAI itself refuses a run without config files
    monai_arguments = monai_run_arguments()
    accepted = (
        declared_ids(load_configs(config_files))
        | monai_arguments
        | _tracking_ids(arguments.get("tracking"))
    )
    unknown = [
        name for name in arguments if name not in monai_arguments and _root_id(name) not in accepted
    ]
    if unknown:
        raise InputError(unknown_settings_sentence(unknown, accepted, config_files))
