"""torchrun helpers: rank and world size, barriers, and rank 0 going first with its outcome shared."""

from __future__ import annotations

import contextlib
import logging
import os

from qdistill.cli import UsageError

logger = logging.getLogger(__name__)


def distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, this process's device) under torchrun or accelerate launch; (0, 1, device) otherwise.

    The process group is set up here (gloo on CPU, nccl on GPUs) so ranks can wait for each other before the
    trainer starts; the trainer's DDP then uses it.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world, device


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside torchrun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _share_outcome(message: str | None) -> str | None:
    """Rank 0's outcome (None, or its error line) sent to every rank."""
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def main_first(rank: int):
    """Rank 0 runs the block first (checking inputs, filling caches); the other ranks run it after, reading what
    it wrote. A bad input found by rank 0 reaches every rank, so all exit 2 with the same one line instead of
    waiting in a barrier for a rank that is gone."""
    if rank_world()[1] == 1:
        yield
        return
    if rank != 0:
        error = _share_outcome(None)
        if error is not None:
            raise UsageError(error)
        yield
        return
    try:
        yield
    except UsageError as e:
        _share_outcome(str(e))
        raise
    _share_outcome(None)
