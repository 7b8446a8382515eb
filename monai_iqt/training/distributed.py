"""Distributed (torchrun) helpers of the training bundle: process group, writer rank, buffers.

``multi_gpu_train.json`` calls :func:`init_process_group` (NCCL on CUDA, gloo on CPU), wraps the
network in DDP and shards data with ``DistributedSampler``; only rank 0 writes files.
"""

from __future__ import annotations

import hashlib
import logging
import os

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

log = logging.getLogger(__name__)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_writer() -> bool:
    """Only rank 0 writes checkpoints, logs, ``runs.json`` and ``models/``."""
    return rank() == 0


def local_device() -> torch.device:
    """This process's device: the GPU of its torchrun local rank, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def ddp_device_ids(device: torch.device) -> list[torch.device] | None:
    """``DistributedDataParallel``'s ``device_ids``: this process's GPU, or None on the CPU."""
    return [device] if device.type == "cuda" else None


def init_process_group() -> None:
    """Join the torchrun process group: NCCL with one GPU per local rank, gloo on CPU."""
    device = local_device()
    if not is_distributed():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    log.info("rank %d of %d on %s (%s)", rank(), world_size(), device, dist.get_backend())


def synchronise() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def destroy_process_group() -> None:
    """Leave the process group once every rank is done: rank 0 still exports the best model
    after the others finish, and a rank tearing gloo down under it aborts the job."""
    if is_distributed():
        synchronise()
        dist.destroy_process_group()


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The plain network inside a DDP/DataParallel wrapper (its state dict has no ``module.``)."""
    wrapped = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return network.module if isinstance(network, wrapped) else network


class BroadcastBuffers:
    """After every training epoch, copy rank 0's BatchNorm running statistics to all ranks.

    DDP keeps parameters identical, but each rank's last forward updates its running statistics
    with its own batch; broadcasting before validation makes every rank validate, checkpoint and
    finish with rank 0's model. Attach before the ``ValidationHandler``.
    """

    def __init__(self, network: torch.nn.Module) -> None:
        self.network = network

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not is_distributed():
            return
        for buffer in unwrap(self.network).buffers():
            dist.broadcast(buffer.data, src=0)


def state_digest(network: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer (name and bytes): equal digests, equal models."""
    digest = hashlib.sha256()
    for name, tensor in sorted(unwrap(network).state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
