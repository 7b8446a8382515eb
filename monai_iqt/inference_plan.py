"""What an inference run will do, checked before anything is written: settings, inputs, outputs.

The bundle's ``initialize`` calls :func:`check_inference_settings` before any component is
built; its ``dataset`` (:func:`inference_dataset`) loads every input with its ``preprocessing``
(:class:`LoadInferenceInput`), checks it and the output folder it will be written to, and hands
the result on as an :class:`InferencePlan`. Bad input is one sentence naming the file or
setting (exit 2 from a bundle entry) and nothing is written. The readers and writers are
imported inside the functions, so importing this module (study.py and evaluation.py do, for
:func:`check_inference_settings`) loads none of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai_iqt import defaults
from preprocessing import layout
from preprocessing.errors import InputError, as_bool, exit_on_bad_input

#: The logger name each log line shows (``logging.conf``: ``%(name)s``) and logging configs
#: select by: the bundle's inference has logged as ``monai_iqt.bundle``.
log = logging.getLogger("monai_iqt.bundle")


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
    from monai_iqt import inferers, inputs, weights

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
    tensor_order: str = defaults.TENSOR_ORDER,
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
    from monai_iqt import bids, inputs, outputs, weights

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
    from monai_iqt import bids, outputs

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

    def __init__(self, tensor_order: str = defaults.TENSOR_ORDER) -> None:
        self.tensor_order = tensor_order

    def __call__(
        self,
        source: Any,
        mask: Any = None,
        bvals: Any = None,
        bvecs: Any = None,
        name: str | None = None,
    ) -> Any:
        from monai_iqt.inputs import load_input

        return load_input(source, mask, bvals, bvecs, name=name, tensor_order=self.tensor_order)


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
