"""Training on several processes with ``torch.distributed``, as ``torchrun`` launches them.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and the rendezvous) in each process's environment;
:func:`start` reads them and joins the process group (gloo on a CPU, nccl on CUDA) with a timeout, so that a rank
that stops answering ends the job with an error instead of a hang. Each rank reads the data and computes the same
split (checked by :func:`same_on_every_rank`); each global batch of the seeded order is shared out among the ranks
(:class:`RankBatches`), DistributedDataParallel averages the gradients, and only rank 0 writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from .errors import BrainscanError

log = logging.getLogger(__name__)
TIMEOUT_S = 600  # a collective that waits longer than this ends the job (a rank died or hangs)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` of ``world_size`` (one process: 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run directory, checkpoints and plots."""
        return self.rank == 0


def from_environment() -> Ranks:
    """The ranks ``torchrun`` set in the environment (one process when it did not).

    Raises:
        BrainscanError: the variables are set but malformed.
    """
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    if "WORLD_SIZE" not in os.environ:
        return Ranks()
    defaults = ("0", "1", "0", "1")
    try:
        rank, world, local, local_world = (int(os.environ.get(n, d)) for n, d in zip(names, defaults, strict=True))
    except ValueError:
        found = [os.environ.get(n) for n in names]
        raise BrainscanError(f"torchrun's {', '.join(names)} are not integers: {found}") from None
    if not 0 <= rank < world:
        raise BrainscanError(f"RANK {rank} is outside 0..{world - 1} (WORLD_SIZE {world}).")
    return Ranks(rank, world, local, max(local_world, 1))


def start(device_type: str, *, timeout_s: float = TIMEOUT_S) -> Ranks:
    """Join the process group when launched by ``torchrun`` with more than one process (gloo on a CPU, nccl on
    CUDA); nothing otherwise."""
    ranks = from_environment()
    if ranks.enabled and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        if not ranks.is_main:  # one voice: rank 0 reports; the others only their own errors
            logging.getLogger("brainscan").setLevel(logging.ERROR)
        log.info("%d processes joined the %s process group.", ranks.world_size, backend)
    return ranks


def stop(ranks: Ranks) -> None:
    if ranks.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.enabled:
        dist.barrier()


def same_on_every_rank(ranks: Ranks, value: Any, what: str) -> None:
    """Check that every rank computed the same ``value`` (JSON-able), e.g. the split.

    Raises:
        BrainscanError: naming the first rank whose ``what`` differs from rank 0's.
    """
    if not ranks.enabled:
        return
    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
    digests: list[str | None] = [None] * ranks.world_size
    dist.all_gather_object(digests, digest)
    for rank, other in enumerate(digests):
        if other != digests[0]:
            raise BrainscanError(f"Rank {rank} computed another {what} than rank 0: the ranks must see the same data.")


def from_main(ranks: Ranks, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a decision every rank must take alike, e.g. early stopping)."""
    if not ranks.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(ranks: Ranks, value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (``[value]`` with one process)."""
    if not ranks.enabled:
        return [value]
    values: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(values, value)
    return values


def sync_buffers(ranks: Ranks, model: nn.Module) -> None:
    """Rank 0's BatchNorm running statistics on every rank (each rank's forward passes moved its own)."""
    if ranks.enabled:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


class RankBatches(Sampler[list[int]]):
    """This rank's share of each global batch: ``sampler`` (a seeded order, the same on every rank) is cut into
    global batches of ``batch_size`` as one process would cut it, and each is dealt out, rank ``r`` taking items
    ``r, r + world_size, ...``. So the ranks together see exactly one process's batches, in its order.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool, ranks: Ranks) -> None:
        if batch_size < ranks.world_size:
            raise BrainscanError(
                f"--batch-size {batch_size} is smaller than the {ranks.world_size} processes sharing each batch."
            )
        self.sampler, self.batch_size, self.drop_last, self.ranks = sampler, batch_size, drop_last, ranks

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        for index in self.sampler:
            batch.append(index)
            if len(batch) == self.batch_size:
                yield self._share(batch)
                batch = []
        if batch and not self.drop_last:
            yield self._share(batch)

    def _share(self, batch: Sequence[int]) -> list[int]:
        share = list(batch[self.ranks.rank :: self.ranks.world_size])
        return share or list(batch[:1])  # a last batch smaller than the world: repeat one item, never empty

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def wrap(model: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel over its trainable parameters (the model itself with one process)."""
    if not ranks.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index if device.index is not None else ranks.local_rank] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)
