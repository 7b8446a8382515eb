"""The command-line boundary of the bundle's ``run`` entries: flags, and bad input as exit 2.

``python -m monai.bundle run`` evaluates config expressions; an entry wrapped with
:func:`exit_on_bad_input` turns the project's :class:`~preprocessing.io.InputError` (one sentence
naming the file or setting) into that sentence on stderr and exit code 2, wherever the error was
raised, including inside MONAI's config parser or dataset wrappers, which re-raise it as the
cause of their own exceptions.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from preprocessing.cli import nearest
from preprocessing.io import InputError

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- settings
# ``python -m monai.bundle run`` turns every ``--name value`` into a config entry whether or not
# the config reads it, so a misspelt setting would silently leave the default in force. Every
# config's ``initialize`` (which MONAI evaluates before ``run``) starts with
# :func:`refuse_unknown_settings`, which compares the names the command line gave with the ids
# the config files declare, before anything is read or written.

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


# --------------------------------------------------------------------------- inference entry
# ``configs/inference.json`` calls these. Functions the config evaluates outside the entry
# (reading the network settings, loading weights, parsing flags) are wrapped too, so bad input
# there is also one sentence and exit 2.


def _inference_api():  # imported late: ``import monai_iqt.bundle`` stays light for every entry
    from monai_iqt import inferers, inputs, outputs, weights

    return inferers, inputs, outputs, weights


@exit_on_bad_input
def network_settings(normalisation_path: str) -> dict[str, Any]:
    """ESPCN_RN settings recorded in ``normalisation.json`` (the bundle's ``network_def``)."""
    return _inference_api()[3].network_settings(normalisation_path)


@exit_on_bad_input
def load_weights(network: Any, model_path: str, normalisation_path: str) -> Any:
    """``network`` with ``model.pt`` loaded, after checking the pair's sha256."""
    weights = _inference_api()[3]
    weights.load_weights(network, model_path, normalisation_path)
    weights.warn_synthetic_training(weights.read_stats(normalisation_path))
    return network


@exit_on_bad_input
def flag(value: bool | str | int) -> bool:
    """A true/false setting (:func:`as_bool`) evaluated by a config."""
    return as_bool(value)


@exit_on_bad_input
def check_inference_settings(
    inference_mode: str,
    roi_size: Any,
    sw_batch_size: Any,
    tensor_order: str,
    repair_tensors: Any,
    mc_samples: Any = 1,
    predict_variance: Any = None,
    normalisation_path: Any = None,
    dropout_rate: Any = None,
    output_tensor_order: Any = None,
    voxel_size_mismatch: Any = None,
) -> None:
    """Every inference setting checked before a component is built (the ``initialize`` step).

    ``predict_variance`` true asks for the intrinsic uncertainty: the weights must have been
    trained with a variance output; ``mc_samples`` > 1 needs weights trained with dropout (the
    rate ``normalisation_path`` records, or ``dropout_rate`` for weights not trained yet, as
    the study's cells).
    """
    inferers, inputs, _, weights = _inference_api()
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise InputError(f"mc_samples {mc_samples!r} must be an integer >= 1.")
    if mc_samples > 1 and dropout_rate is not None and float(dropout_rate) <= 0:
        raise InputError(
            f"mc_samples {mc_samples} needs weights trained with dropout, but the models are "
            f"trained with dropout_rate {dropout_rate}: give --dropout_rate > 0 or mc_samples 1."
        )
    if normalisation_path is not None and (
        mc_samples > 1 or (predict_variance is not None and as_bool(predict_variance))
    ):
        settings = weights.network_settings(normalisation_path)
        if predict_variance is not None and as_bool(predict_variance):
            if not settings["predict_variance"]:
                raise InputError(
                    f"predict_variance true needs weights trained with a variance output, but "
                    f"{normalisation_path} records predict_variance false."
                )
        if mc_samples > 1 and settings["dropout_rate"] <= 0:
            raise InputError(
                f"mc_samples {mc_samples} needs weights trained with dropout, but "
                f"{normalisation_path} records dropout_rate 0."
            )
    if inference_mode not in inferers.INFERENCE_MODES:
        raise InputError(
            f"inference_mode {inference_mode!r} is not one of "
            f"{', '.join(inferers.INFERENCE_MODES)}."
        )
    sizes = roi_size if isinstance(roi_size, list | tuple) else [roi_size]
    if len(sizes) not in (1, 3) or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in sizes
    ):
        raise InputError(f"roi_size {roi_size!r} must be an integer or a list of 3 integers.")
    if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, int) or sw_batch_size < 1:
        raise InputError(f"sw_batch_size {sw_batch_size!r} must be an integer >= 1.")
    for setting, value in (
        ("tensor_order", tensor_order),
        ("output_tensor_order", output_tensor_order),
    ):
        if value is not None and value not in inputs.TENSOR_ORDERS:
            raise InputError(
                f"{setting} {value!r} is not one of {', '.join(inputs.TENSOR_ORDERS)} (a tensor "
                "file's element order and frame)."
            )
    if tensor_order is None:
        raise InputError(f"tensor_order must be one of {', '.join(inputs.TENSOR_ORDERS)}.")
    if voxel_size_mismatch is not None and voxel_size_mismatch not in inputs.VOXEL_SIZE_CHOICES:
        raise InputError(
            f"voxel_size_mismatch {voxel_size_mismatch!r} is not one of "
            f"{', '.join(inputs.VOXEL_SIZE_CHOICES)} (what to do with an input whose voxels are "
            "not the trained LR voxels)."
        )
    as_bool(repair_tensors)


def output_convention(tensor_order: str, output_tensor_order: Any = None) -> str:
    """The convention outputs are written in: ``output_tensor_order``, else the input's."""
    if output_tensor_order is None or str(output_tensor_order) in ("", "None"):
        return tensor_order
    return str(output_tensor_order)


@dataclass
class InferencePlan:
    """Validated inputs and where each one's outputs go (``prepare_inference``)."""

    items: list[Any]
    targets: dict[str, Path]
    #: per input name: its output file names and record name (BIDS derivatives' names)
    names: dict[str, dict[str, str]] = field(default_factory=dict)
    record_names: dict[str, str] = field(default_factory=dict)
    #: a BIDS input's dataset root: outputs form a derivatives tree below ``output_dir``
    bids_root: Path | None = None
    output_dir: Path | None = None
    #: one sentence per BIDS DWI that cannot be used (the others still run; exit 2 at the end)
    failures: list[str] = field(default_factory=list)


def prepare_inference(
    input: Any,
    output_dir: Any,
    mask: Any = None,
    bvals: Any = None,
    bvecs: Any = None,
    tensor_order: str = "dipy",
    normalisation_path: Any = None,
    voxel_size_mismatch: Any = None,
    load: Callable[..., Any] | None = None,
) -> InferencePlan:
    """Validate the output folders, then load (``load``, the config's ``preprocessing``; by
    default :class:`LoadInferenceInput` in ``tensor_order``) and check every input (nothing
    written yet).

    With ``normalisation_path``, each input's voxel size is checked against the LR voxel size the
    weights were trained on (``voxel_size_mismatch``: refuse, resample or allow). A BIDS dataset
    (or subject or session folder) is read DWI by DWI: one that cannot be used is kept as a
    sentence in ``failures`` while the others go on, unless none can be used.
    """
    from monai_iqt import bids
    from preprocessing import layout

    _, inputs, outputs, weights = _inference_api()
    load = load or LoadInferenceInput(tensor_order)
    if input is None or str(input) in ("", "None"):
        raise InputError(
            "no input given: pass --input PATH (an LR tensor NIfTI, a DWI, a folder or a BIDS "
            "dataset)."
        )
    if output_dir is None or str(output_dir) in ("", "None"):
        raise InputError("no output folder given: pass --output_dir DIR.")
    source, output_dir = Path(input), Path(output_dir)
    trained = None
    if normalisation_path is not None and Path(str(normalisation_path)).is_file():
        trained = weights.read_stats(normalisation_path).extra.get("lr_voxel_size_mm")

    def check_resolution(item: Any) -> Any:
        if normalisation_path is None:
            return item
        if trained is None:
            weights.read_stats(normalisation_path)  # a missing file: one sentence naming it
        return inputs.check_voxel_size(item, trained, voxel_size_mismatch)

    if source.is_dir() and bids.dataset_root(source) is not None:
        return _prepare_bids(source, output_dir, load, check_resolution)
    if source.is_dir():
        folders = layout.subject_folders(source, (layout.DT_LR,))
        if not folders:
            raise InputError(
                f"{source} holds no subject folder with a dt_lr.nii.gz and is not a BIDS dataset "
                "(no dataset_description.json)."
            )
        targets = {folder.name: output_dir / folder.name for folder in folders}
        sources = {folder.name: folder / "dt_lr.nii.gz" for folder in folders}
        outputs.check_output_dir(output_dir, tuple(sources.values()), names={})
    else:
        targets = {inputs.stem(source): output_dir}
        sources = {inputs.stem(source): source}
    for name, target in targets.items():
        outputs.check_output_dir(target, (sources[name],))
    if source.is_dir():
        items = [load(sources[name], name=name) for name in targets]
    else:
        items = [load(source, mask, bvals, bvecs)]
    return InferencePlan([check_resolution(item) for item in items], targets)


def _prepare_bids(
    source: Path, output_dir: Path, load: Callable[..., Any], check_resolution: Callable[[Any], Any]
) -> InferencePlan:
    """Every DWI of a BIDS input, loaded and checked; the unusable ones as sentences."""
    from monai_iqt import bids

    _, inputs, outputs, _ = _inference_api()
    dwis = bids.find_dwis(source)
    bids.check_derivatives_root(output_dir)
    plan = InferencePlan([], {}, bids_root=bids.dataset_root(source), output_dir=output_dir)
    for dwi in dwis:
        name = dwi.prefix
        plan.targets[name] = output_dir / dwi.folder
        plan.names[name] = dwi.output_names()
        plan.record_names[name] = dwi.record_name
        outputs.check_output_dir(
            plan.targets[name], (dwi.path,), plan.names[name], plan.record_names[name]
        )
    for dwi in dwis:
        problem = bids.missing_gradients(dwi)
        if problem is None:
            try:
                item = load(dwi.path, None, dwi.bval, dwi.bvec, name=dwi.prefix)
                plan.items.append(check_resolution(item))
                continue
            except InputError as error:
                problem = str(error)
        log.error("%s", problem)
        plan.failures.append(problem)
    if not plan.items:
        raise InputError(plan.failures[0])
    return plan


class LoadInferenceInput:
    """The inference ``preprocessing``: one input loaded and checked in ``tensor_order``
    (:func:`monai_iqt.inputs.load_input`: a tensor image, or a DWI fitted with DIPY)."""

    def __init__(self, tensor_order: str = "dipy") -> None:
        self.tensor_order = tensor_order

    def __call__(
        self,
        source: Any,
        mask: Any = None,
        bvals: Any = None,
        bvecs: Any = None,
        name: str | None = None,
    ) -> Any:
        return _inference_api()[1].load_input(
            source, mask, bvals, bvecs, name=name, tensor_order=self.tensor_order
        )


@exit_on_bad_input
def inference_dataset(
    input: Any,
    output_dir: Any,
    mask: Any = None,
    bvals: Any = None,
    bvecs: Any = None,
    preprocessing: LoadInferenceInput | None = None,
    normalisation_path: Any = None,
    voxel_size_mismatch: Any = None,
    dataset_dir: Any = None,
) -> InferencePlan:
    """The inference ``dataset``: every input loaded by ``preprocessing`` and checked, with where
    its outputs go (:func:`prepare_inference`; nothing written yet). ``dataset_dir`` is the model
    zoo's name for a folder input: give it or ``input``, not both."""
    given = [value for value in (input, dataset_dir) if value is not None and str(value) != ""]
    if len(given) == 2:
        raise InputError(
            f"input {input} and dataset_dir {dataset_dir} both given: pass one of them."
        )
    preprocessing = preprocessing or LoadInferenceInput()
    return prepare_inference(
        given[0] if given else None,
        output_dir,
        mask,
        bvals,
        bvecs,
        preprocessing.tensor_order,
        normalisation_path,
        voxel_size_mismatch,
        load=preprocessing,
    )


def predict_and_write(
    volume_inferer: Any,
    writer: Any,
    plan: InferencePlan,
    provenance: dict,
    tensor_order: str = "dipy",
    output_tensor_order: Any = None,
) -> dict[str, dict[str, Path]]:
    """Super-resolve each validated input and write its files (tensors in the input's
    convention ``tensor_order`` unless ``output_tensor_order`` is given).

    BIDS outputs use BEP016's element order and names, and the derivatives tree gets its
    ``dataset_description.json``; DWIs that could not be used are then one sentence (exit 2),
    after the others' outputs are written.
    """
    from monai_iqt import bids
    from preprocessing.geometry import hr_affine_from_lr
    from preprocessing.tensor_conventions import BIDS_ORDER

    inferers, inputs, outputs, _ = _inference_api()
    written = {}
    r = volume_inferer.upscale_factor
    for item in plan.items:
        region = (
            inputs.inference_region(item.mask_lr)
            if item.mask_lr is not None
            else np.any(item.dt_lr != 0, axis=-1)
        )
        dt_std = None
        if volume_inferer.gives_std:
            dt_hr, dt_std = volume_inferer.predict_with_std(item.dt_lr, region)
        else:
            dt_hr = volume_inferer(item.dt_lr, region)
        mask_hr = inferers.repeat_blocks(region, r)
        record = {
            **provenance,
            "input": str(item.source),
            "input_tensor_order": tensor_order,
            "mask": item.mask_source,
            "upscale_factor": r,
            "inference_mode": volume_inferer.inferer.inference_mode,
            "mc_samples": volume_inferer.mc_samples,
            "resolution": item.resolution,
        }
        sidecar = {
            "Sources": [str(item.source)],
            "InputTensorConvention": tensor_order,
            **(item.resolution or {}),
        }
        written[item.name] = writer(
            plan.targets[item.name],
            dt_hr,
            mask_hr,
            hr_affine_from_lr(item.affine, r),
            record,
            dt_std,
            convention=output_convention(tensor_order, output_tensor_order),
            sidecar=sidecar,
            names=plan.names.get(item.name, outputs.OUTPUT_NAMES),
            record_name=plan.record_names.get(item.name, outputs.RECORD_NAME),
            order=BIDS_ORDER if plan.bids_root is not None else None,
        )
        log.info("%s -> %s", item.source, plan.targets[item.name])
    if plan.bids_root is not None:
        bids.write_dataset_description(plan.output_dir, plan.bids_root)
    if plan.failures:
        others = len(plan.failures) - 1
        more = f"; {others} more DWI(s) failed too (see the log)" if others else ""
        raise InputError(
            f"{plan.failures[0].rstrip('.')}{more}; the other {len(plan.items)} DWI(s) were "
            "written."
        )
    return written


def _provenance(model_path: Any, stats: Any) -> dict[str, Any]:
    return {
        "model_path": str(model_path),
        "weights_sha256": stats.extra.get("weights_sha256"),
        "num_blocks": stats.extra.get("num_blocks"),
        "trained_on": stats.extra.get("trained_on", "unknown"),
    }


def run_inference(
    input: Any,
    output_dir: Any,
    model_path: Any,
    normalisation_path: Any,
    mask: Any = None,
    bvals: Any = None,
    bvecs: Any = None,
    roi_size: Any = 96,
    sw_batch_size: int = 1,
    device: Any = None,
    inference_mode: str = "whole_volume",
    tensor_order: str = "dipy",
    repair_tensors: bool = False,
    mc_samples: int = 1,
    predict_variance: bool | None = None,
    seed: int = 0,
    output_tensor_order: str | None = None,
    voxel_size_mismatch: str | None = None,
) -> dict[str, dict[str, Path]]:
    """Validate every input and output folder, then load the model, predict and write.

    ``input`` is an LR tensor NIfTI, a DWI NIfTI with ``bvals``/``bvecs``, or a folder of
    subject folders each holding ``dt_lr.nii.gz`` (and ``mask_lr.nii.gz``). Returns the written
    paths per subject name. Raises InputError (one sentence) on bad input.
    """
    inferers, _, outputs, _ = _inference_api()
    check_inference_settings.__wrapped__(
        inference_mode,
        roi_size,
        sw_batch_size,
        tensor_order,
        repair_tensors,
        mc_samples,
        output_tensor_order=output_tensor_order,
        voxel_size_mismatch=voxel_size_mismatch,
    )
    plan = prepare_inference(
        input,
        output_dir,
        mask,
        bvals,
        bvecs,
        tensor_order,
        normalisation_path,
        voxel_size_mismatch,
    )
    check_inference_settings.__wrapped__(
        inference_mode,
        roi_size,
        sw_batch_size,
        tensor_order,
        repair_tensors,
        mc_samples,
        predict_variance,
        normalisation_path,
    )
    volume_inferer = inferers.make_inferer(
        model_path,
        normalisation_path,
        roi_size,
        sw_batch_size,
        device,
        inference_mode,
        mc_samples=mc_samples,
        seed=seed,
    )
    writer = outputs.PredictionWriter(as_bool(repair_tensors))
    provenance = _provenance(model_path, volume_inferer.stats)
    return predict_and_write(
        volume_inferer, writer, plan, provenance, tensor_order, output_tensor_order
    )


@exit_on_bad_input
def inference(
    input: Any,
    output_dir: Any,
    network: Any,
    inferer: Any,
    writer: Any,
    model_path: Any,
    normalisation_path: Any,
    mask: Any = None,
    bvals: Any = None,
    bvecs: Any = None,
    tensor_order: str = "dipy",
    device: Any = None,
    mc_samples: int = 1,
    seed: int = 0,
    output_tensor_order: Any = None,
    voxel_size_mismatch: Any = None,
) -> dict[str, dict[str, Path]]:
    """Inference from Python: the network (weights loaded), inferer and writer applied to
    ``input``; bad input is one sentence and exit 2."""
    plan = prepare_inference(
        input,
        output_dir,
        mask,
        bvals,
        bvecs,
        tensor_order,
        normalisation_path,
        voxel_size_mismatch,
    )
    return InferenceEvaluator(
        plan,
        network,
        inferer,
        writer,
        model_path,
        normalisation_path,
        device,
        mc_samples,
        seed,
        tensor_order,
        output_tensor_order,
    ).run()


class InferenceEvaluator:
    """The inference config's ``evaluator``: super-resolves every input of ``dataset`` (an
    :class:`InferencePlan`, all inputs loaded and checked by its ``preprocessing`` before anything
    is written) with ``network`` and ``inferer`` and writes each with ``postprocessing``, in
    ``output_tensor_order`` or else the input's ``tensor_order``.

    Not an Ignite engine: whole volumes go through the halo-exact inferer one subject at a time,
    with per-subject output folders and provenance records.
    """

    def __init__(
        self,
        dataset: InferencePlan,
        network: Any,
        inferer: Any,
        postprocessing: Any,
        model_path: Any,
        normalisation_path: Any,
        device: Any = None,
        mc_samples: int = 1,
        seed: int = 0,
        tensor_order: str = "dipy",
        output_tensor_order: Any = None,
    ) -> None:
        self.dataset = dataset
        self.network = network
        self.inferer = inferer
        self.postprocessing = postprocessing
        self.model_path = model_path
        self.normalisation_path = normalisation_path
        self.device = device
        self.mc_samples = mc_samples
        self.seed = seed
        self.tensor_order = tensor_order
        self.output_tensor_order = output_tensor_order

    @exit_on_bad_input
    def run(self) -> dict[str, dict[str, Path]]:
        """The bundle's ``run``: bad input is one sentence and exit 2."""
        inferers, _, _, weights = _inference_api()
        stats = weights.read_stats(self.normalisation_path)
        network_halo = inferers.network_halo(self.network)
        self.inferer.roi_size = inferers.bundle_window(self.inferer.roi_size, network_halo)
        volume_inferer = inferers.WholeBrainInferer(
            self.network,
            stats,
            upscale_factor=int(stats.extra.get("upscale_factor", 2)),
            device=self.device,
            inferer=self.inferer,
            mc_samples=self.mc_samples,
            seed=self.seed,
        )
        provenance = _provenance(self.model_path, stats)
        return predict_and_write(
            volume_inferer,
            self.postprocessing,
            self.dataset,
            provenance,
            self.tensor_order,
            self.output_tensor_order,
        )
