"""The bundle's inference run: the network built, then each planned input predicted and written.

``configs/inference.json`` builds its ``network`` with :func:`network_settings` and
:func:`load_weights`, reads true/false settings with :func:`flag`, and its ``run`` is
:meth:`InferenceEvaluator.run`, which predicts each input of an
:class:`~monai_iqt.inference_plan.InferencePlan` and writes it (:func:`predict_and_write`).
:func:`run_inference` (settings to written files in one call) and :func:`inference` (the
config's components applied from Python) serve Python callers. Functions a config evaluates are
wrapped with :func:`~preprocessing.errors.exit_on_bad_input`, so bad input there is one sentence and
exit 2. The readers, writers and inferers are imported inside the functions, so importing this
module (evaluate.json does, for :func:`network_settings`) loads none of them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from monai_iqt import defaults
from monai_iqt.inference_plan import InferencePlan, check_inference_settings, prepare_inference
from preprocessing.errors import InputError, as_bool, exit_on_bad_input
from preprocessing.geometry import repeat_blocks

#: The logger name each log line shows (``logging.conf``: ``%(name)s``) and logging configs
#: select by: the bundle's inference has logged as ``monai_iqt.bundle``.
log = logging.getLogger("monai_iqt.bundle")


@exit_on_bad_input
def network_settings(normalisation_path: str) -> dict[str, Any]:
    """ESPCN_RN settings recorded in ``normalisation.json`` (the bundle's ``network_def``)."""
    from monai_iqt import weights

    return weights.network_settings(normalisation_path)


@exit_on_bad_input
def load_weights(network: Any, model_path: str, normalisation_path: str) -> Any:
    """``network`` with ``model.pt`` loaded, after checking the pair's sha256."""
    from monai_iqt import weights

    weights.load_weights(network, model_path, normalisation_path)
    weights.warn_synthetic_training(weights.read_stats(normalisation_path))
    return network


@exit_on_bad_input
def flag(value: bool | str | int) -> bool:
    """A true/false setting (:func:`as_bool`) evaluated by a config."""
    return as_bool(value)


def output_convention(tensor_order: str, output_tensor_order: Any = None) -> str:
    """The convention outputs are written in: ``output_tensor_order``, else the input's."""
    if output_tensor_order is None or str(output_tensor_order) in ("", "None"):
        return tensor_order
    return str(output_tensor_order)


def predict_and_write(
    volume_inferer: Any,
    writer: Any,
    plan: InferencePlan,
    provenance: dict,
    tensor_order: str = defaults.TENSOR_ORDER,
    output_tensor_order: Any = None,
) -> dict[str, dict[str, Path]]:
    """Super-resolve each validated input and write its files (tensors in the input's
    convention ``tensor_order`` unless ``output_tensor_order`` is given).

    BIDS outputs use BEP016's element order and names, and the derivatives tree gets its
    ``dataset_description.json``; DWIs that could not be used are then one sentence (exit 2),
    after the others' outputs are written.
    """
    from monai_iqt import bids, inputs, outputs
    from preprocessing.geometry import hr_affine_from_lr
    from preprocessing.tensor_conventions import BIDS_ORDER

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
        mask_hr = repeat_blocks(region, r)
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
    roi_size: Any = defaults.ROI_SIZE,
    sw_batch_size: int = defaults.SW_BATCH_SIZE,
    device: Any = None,
    inference_mode: str = defaults.INFERENCE_MODE,
    tensor_order: str = defaults.TENSOR_ORDER,
    repair_tensors: bool = defaults.REPAIR_TENSORS,
    mc_samples: int = defaults.MC_SAMPLES,
    predict_variance: bool | None = None,
    seed: int = defaults.SEED,
    output_tensor_order: str | None = None,
    voxel_size_mismatch: str | None = None,
) -> dict[str, dict[str, Path]]:
    """Validate every input and output folder, then load the model, predict and write.

    ``input`` is an LR tensor NIfTI, a DWI NIfTI with ``bvals``/``bvecs``, or a folder of
    subject folders each holding ``dt_lr.nii.gz`` (and ``mask_lr.nii.gz``). Returns the written
    paths per subject name. Raises InputError (one sentence) on bad input.
    """
    from monai_iqt import inferers, outputs

    check_inference_settings.__wrapped__(  # every setting, as the bundle's initialize does
        inference_mode,
        roi_size,
        sw_batch_size,
        tensor_order,
        repair_tensors,
        mc_samples,
        predict_variance,
        normalisation_path,
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
    tensor_order: str = defaults.TENSOR_ORDER,
    device: Any = None,
    mc_samples: int = defaults.MC_SAMPLES,
    seed: int = defaults.SEED,
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
        mc_samples: int = defaults.MC_SAMPLES,
        seed: int = defaults.SEED,
        tensor_order: str = defaults.TENSOR_ORDER,
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
        from monai_iqt import inferers, weights

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
