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
    if tensor_order not in inputs.TENSOR_ORDERS:
        raise InputError(
            f"tensor_order {tensor_order!r} is not one of {', '.join(inputs.TENSOR_ORDERS)}."
        )
    as_bool(repair_tensors)


def inference_records(
    input: Any, output_dir: Any, mask: Any = None, bvals: Any = None, bvecs: Any = None
) -> list[dict[str, Any]]:
    """One record per subject to super-resolve (its input files and output folder), after the
    output folders are checked; nothing is read or written yet."""
    _, inputs, outputs, _ = _inference_api()
    if input is None or str(input) in ("", "None"):
        raise InputError(
            "no input given: pass --input PATH (an LR tensor NIfTI, a DWI or a folder)."
        )
    if output_dir is None or str(output_dir) in ("", "None"):
        raise InputError("no output folder given: pass --output_dir DIR.")
    source, output_dir = Path(input), Path(output_dir)
    if source.is_dir():
        folders = inputs.discover_inputs(source)
        if not folders:
            raise InputError(f"{source} holds no subject folder with a dt_lr.nii.gz.")
        records = [
            {
                "name": folder.name,
                "source": folder / "dt_lr.nii.gz",
                "target": output_dir / folder.name,
            }
            for folder in folders
        ]
        outputs.check_output_dir(output_dir, tuple(r["source"] for r in records), names={})
    else:
        records = [
            {
                "name": inputs.stem(source),
                "source": source,
                "target": output_dir,
                "mask": mask,
                "bvals": bvals,
                "bvecs": bvecs,
            }
        ]
    for record in records:
        outputs.check_output_dir(record["target"], (record["source"],))
    return records


class LoadInferenceInput:
    """The inference ``preprocessing``: a subject record gains ``item``, its validated input
    (:func:`monai_iqt.inputs.load_input`: a tensor image, or a DWI fitted with DIPY)."""

    def __init__(self, tensor_order: str = "dipy") -> None:
        self.tensor_order = tensor_order

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        item = _inference_api()[1].load_input(
            record["source"],
            record.get("mask"),
            record.get("bvals"),
            record.get("bvecs"),
            name=record["name"],
            tensor_order=self.tensor_order,
        )
        return {**record, "item": item}


@exit_on_bad_input
def inference_dataset(
    input: Any,
    output_dir: Any,
    mask: Any = None,
    bvals: Any = None,
    bvecs: Any = None,
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    dataset_dir: Any = None,
) -> Any:
    """The inference ``dataset``: a MONAI Dataset of the :func:`inference_records`, each loaded
    by ``transform`` (the ``preprocessing``) when read. ``dataset_dir`` is the model zoo's name
    for a folder input: give it or ``input``, not both."""
    from monai.data import Dataset

    given = [value for value in (input, dataset_dir) if value is not None and str(value) != ""]
    if len(given) == 2:
        raise InputError(
            f"input {input} and dataset_dir {dataset_dir} both given: pass one of them."
        )
    source = given[0] if given else None
    return Dataset(inference_records(source, output_dir, mask, bvals, bvecs), transform=transform)


def prepare_inference(
    input: Any,
    output_dir: Any,
    mask: Any = None,
    bvals: Any = None,
    bvecs: Any = None,
    tensor_order: str = "dipy",
) -> tuple[list[Any], dict[str, Path]]:
    """Validate the output folders, then load and check every input (nothing written yet)."""
    records = inference_records(input, output_dir, mask, bvals, bvecs)
    load = LoadInferenceInput(tensor_order)
    items = [load(record)["item"] for record in records]
    return items, {record["name"]: record["target"] for record in records}


def predict_and_write(
    volume_inferer: Any, writer: Any, items: list[Any], targets: dict[str, Path], provenance: dict
) -> dict[str, dict[str, Path]]:
    """Super-resolve each validated input and write its files."""
    from preprocessing.geometry import hr_affine_from_lr

    inferers, inputs, _, _ = _inference_api()
    written = {}
    r = volume_inferer.upscale_factor
    for item in items:
        inputs.warn_voxel_size(
            item.affine, volume_inferer.stats.extra.get("lr_voxel_size_mm"), item.source
        )
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
            "mask": item.mask_source,
            "upscale_factor": r,
            "inference_mode": volume_inferer.inferer.inference_mode,
            "mc_samples": volume_inferer.mc_samples,
        }
        written[item.name] = writer(
            targets[item.name], dt_hr, mask_hr, hr_affine_from_lr(item.affine, r), record, dt_std
        )
        log.info("%s -> %s", item.source, targets[item.name])
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
) -> dict[str, dict[str, Path]]:
    """Validate every input and output folder, then load the model, predict and write.

    ``input`` is an LR tensor NIfTI, a DWI NIfTI with ``bvals``/``bvecs``, or a folder of
    subject folders each holding ``dt_lr.nii.gz`` (and ``mask_lr.nii.gz``). Returns the written
    paths per subject name. Raises InputError (one sentence) on bad input.
    """
    inferers, _, outputs, _ = _inference_api()
    check_inference_settings.__wrapped__(
        inference_mode, roi_size, sw_batch_size, tensor_order, repair_tensors, mc_samples
    )
    items, targets = prepare_inference(input, output_dir, mask, bvals, bvecs, tensor_order)
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
    return predict_and_write(volume_inferer, writer, items, targets, provenance)


def _predict_all(
    items: list[Any],
    targets: dict[str, Path],
    network: Any,
    inferer: Any,
    writer: Any,
    model_path: Any,
    normalisation_path: Any,
    device: Any = None,
    mc_samples: int = 1,
    seed: int = 0,
) -> dict[str, dict[str, Path]]:
    """The config's network (weights loaded) and halo-exact inferer over every loaded input."""
    inferers, _, _, weights = _inference_api()
    stats = weights.read_stats(normalisation_path)
    network_halo = inferers.network_halo(network)
    inferer.roi_size = inferers.bundle_window(inferer.roi_size, network_halo)
    volume_inferer = inferers.WholeBrainInferer(
        network,
        stats,
        upscale_factor=int(stats.extra.get("upscale_factor", 2)),
        device=device,
        inferer=inferer,
        mc_samples=mc_samples,
        seed=seed,
    )
    return predict_and_write(volume_inferer, writer, items, targets, _provenance(model_path, stats))


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
) -> dict[str, dict[str, Path]]:
    """Inference from Python: the network (weights loaded), inferer and writer applied to
    ``input``; bad input is one sentence and exit 2."""
    items, targets = prepare_inference(input, output_dir, mask, bvals, bvecs, tensor_order)
    return _predict_all(
        items,
        targets,
        network,
        inferer,
        writer,
        model_path,
        normalisation_path,
        device,
        mc_samples,
        seed,
    )


class InferenceEvaluator:
    """The inference config's ``evaluator``: reads every record of ``dataset`` (its
    ``preprocessing`` loads and checks each input, all before anything is written), then
    super-resolves each with ``network`` and ``inferer`` and writes it with ``postprocessing``.

    Not an Ignite engine: whole volumes go through the halo-exact inferer one subject at a time,
    with per-subject output folders and provenance records.
    """

    def __init__(
        self,
        dataset: Any,
        network: Any,
        inferer: Any,
        postprocessing: Any,
        model_path: Any,
        normalisation_path: Any,
        device: Any = None,
        mc_samples: int = 1,
        seed: int = 0,
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

    @exit_on_bad_input
    def run(self) -> dict[str, dict[str, Path]]:
        """The bundle's ``run``: bad input is one sentence and exit 2, nothing written."""
        records = [self.dataset[i] for i in range(len(self.dataset))]
        return _predict_all(
            [record["item"] for record in records],
            {record["name"]: record["target"] for record in records},
            self.network,
            self.inferer,
            self.postprocessing,
            self.model_path,
            self.normalisation_path,
            self.device,
            self.mc_samples,
            self.seed,
        )
