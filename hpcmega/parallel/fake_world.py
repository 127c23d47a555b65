"""One process standing in for one rank of a job of any size: torch's "fake" process group.

Collectives on it return at once without moving data (values are meaningless, shapes and allocations are real), so
DTensor sharding, FSDP2 and pipeline stages build exactly as on rank ``rank`` of ``world_size``. That is how the
per-rank memory of a 64-GPU layout is measured on a laptop (tests/test_init_memory.py, tests/test_recompute.py).

Use one rank per process: DeviceMesh objects compare equal by shape, and a submesh torch derived for an earlier
fake world of the same shape can be handed out again with *that* world's coordinates. ``fake_world`` therefore
refuses a second rank of the same world size in one process (tests spawn a process per rank instead).

``FakeStore`` lives in torch's private ``torch.testing._internal.distributed.fake_pg``; this module is the only
place that imports it, so a torch upgrade that moves it breaks one line (pinned by tests/test_fake_world.py).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from hpcmega.planning.dims import ParallelDims


_RANK_BY_WORLD_SIZE: dict[int, int] = {}


def init_fake_process_group(rank: int, world_size: int) -> None:
    """Make this process rank ``rank`` of a fake ``world_size``-rank job (the default process group, kept)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process; a fake world needs its own")
    if _RANK_BY_WORLD_SIZE.setdefault(world_size, rank) != rank:
        raise RuntimeError(f"this process already was rank {_RANK_BY_WORLD_SIZE[world_size]} of a fake world of "
                           f"{world_size}; use a new process for rank {rank} (meshes of one shape are shared)")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


@contextlib.contextmanager
def fake_world(world_size: int, rank: int = 0) -> Iterator[None]:
    """:func:`init_fake_process_group` for the duration of a ``with`` block; torn down after."""
    init_fake_process_group(rank, world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def fake_mesh(pp: int, dp: int, tp: int) -> DeviceMesh:
    """The training mesh (dims pp, dp, tp) on CPU, inside :func:`fake_world` of size pp x dp x tp."""
    return ParallelDims(pp=pp, dp=dp, tp=tp).build_mesh("cpu")
