"""Two timeouts for training collectives: a long one until the first step has finished, the configured one after.

Why: before and during the first step, a collective may legitimately wait for a long time -- ranks build and
initialise their shards, load a checkpoint, and ``torch.compile`` compiles on every rank at its own speed (minutes
for a big model, and the fastest rank waits in the first collective for the slowest). After the first step every
rank runs the same compiled code, so a rank stuck in a collective for ``cluster.collective_timeout_s`` is a hang
and the job should end (and be requeued) rather than burn its allocation. One timeout for both either kills
healthy first steps or lets real hangs run for half an hour. (Checkpoint save/load have their own gloo group and
``checkpoint.timeout_s``: :func:`hpcmega.checkpoint.store.checkpoint_group`.)

The default process group is created with the first-step timeout; :class:`CollectiveTimeouts` sets it on every
group of the mesh as well -- DeviceMesh creates its per-dimension groups with torch's backend default (10 min for
NCCL, 30 min for gloo), not with the default group's timeout -- and lowers all of them after the first step.

PyTorch has no public call to change a live group's timeout; :func:`set_group_timeout` is the one seam over the
private ``torch.distributed.distributed_c10d._set_pg_timeout`` (pinned by tests/test_job_runtime.py).
"""
from __future__ import annotations

import datetime
from typing import Any


def set_group_timeout(group: Any, seconds: float) -> None:
    """Change the timeout of the live process group ``group`` (gloo or NCCL) for the collectives that follow."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    _set_pg_timeout(datetime.timedelta(seconds=seconds), group)


class CollectiveTimeouts:
    """The default group and every group of ``mesh`` wait ``first_step_s`` until :meth:`first_step_done`, then
    ``steady_s``. Changing a timeout is local (no communication); every rank switches after the same step."""

    def __init__(self, mesh: Any, first_step_s: float, steady_s: float) -> None:
        import torch.distributed as dist

        self.groups = [dist.group.WORLD] + [mesh.get_group(name) for name in mesh.mesh_dim_names]
        self.steady_s = steady_s
        self.in_first_step = True
        self._set(max(first_step_s, steady_s))

    def first_step_done(self) -> None:
        if self.in_first_step:
            self.in_first_step = False
            self._set(self.steady_s)

    def _set(self, seconds: float) -> None:
        for group in self.groups:
            set_group_timeout(group, seconds)
