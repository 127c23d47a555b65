"""Communication accounting: which collectives one training step issues, on which mesh dimension, and how many bytes
each rank puts on the wire -- measured, to compare with the planner's analytical count
(:func:`hpcmega.planning.estimate.comm_bytes_per_step`).

Why a ``TorchDispatchMode`` and not a wrapper around ``torch.distributed``: the three parallel dimensions issue their
traffic through different layers. DTensor (TP/SP) calls the functional collectives (``_c10d_functional.*``) from
C++; FSDP2 and ``torch.distributed.pipelining`` (P2P ``send``/``recv_``) reach the ``c10d.*`` dispatcher ops without
going through the Python functions a monkey-patch would see (measured on torch 2.13: a wrapper around
``dist.all_gather_into_tensor`` sees none of FSDP2's all-gathers). Every one of them passes the dispatcher, so a
dispatch mode sees them all, with their tensors and process group. ``CommDebugMode`` counts ops but not bytes and
not P2P, hence this small recorder.

Bytes: ``payload`` is the size of the whole buffer a collective is about (an all-gather's output, a
reduce-scatter's input); ``wire`` is what one rank sends for it with ring algorithms (the planner's convention:
:func:`hpcmega.planning.estimate.wire_bytes`). A group shared by several mesh dimensions (e.g. tp = world size) is
attributed to the dimension of size > 1; scalar all-reduces over the whole world (loss, grad norm) land there too.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.utils._python_dispatch import TorchDispatchMode

from hpcmega.planning.estimate import wire_bytes

# op name (without overload) -> (collective kind, index of the argument whose tensors are the payload)
_OPS: dict[str, tuple[str, int]] = {
    # functional collectives (DTensor): payload = input, except all-gather (output = input x group size)
    "all_reduce": ("all_reduce", 0),
    "all_reduce_coalesced": ("all_reduce", 0),
    "all_gather_into_tensor": ("all_gather", 0),
    "all_gather_into_tensor_coalesced": ("all_gather", 0),
    "reduce_scatter_tensor": ("reduce_scatter", 0),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", 0),
    "all_to_all_single": ("all_to_all", 0),
    "broadcast": ("broadcast", 0),
    # c10d ops (FSDP2, pipelining, torch.distributed calls)
    "allreduce_": ("all_reduce", 0),
    "allreduce_coalesced_": ("all_reduce", 0),
    "_allgather_base_": ("all_gather", 0),  # (output, input, ...)
    "allgather_": ("all_gather", 0),
    "allgather_into_tensor_coalesced_": ("all_gather", 0),
    "_reduce_scatter_base_": ("reduce_scatter", 1),  # (output, input, ...)
    "reduce_scatter_": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "alltoall_base_": ("all_to_all", 1),
    "broadcast_": ("broadcast", 0),
    "send": ("send", 0),
    "recv_": ("recv", 0),
}
_FUNCTIONAL_GATHERS = ("all_gather_into_tensor", "all_gather_into_tensor_coalesced")


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(y) for y in x)
    return 0


def _dtype(x: Any) -> str | None:
    """The element type of a collective's payload (a tensor or a list of them), e.g. "float32"."""
    if isinstance(x, torch.Tensor):
        return str(x.dtype).removeprefix("torch.")
    if isinstance(x, (list, tuple)) and x:
        return _dtype(x[0])
    return None


def _group_of(args: tuple, sized: bool) -> tuple[str | None, int | None]:
    """(group name, group size) of a collective's arguments: a ProcessGroup (c10d ops) or a group name (functional
    collectives, whose size comes from the mesh map or a ``group_size`` argument)."""
    for a in args:
        if isinstance(a, torch.ScriptObject):
            try:
                pg = dist.ProcessGroup.unbox(a)
            except (RuntimeError, TypeError):
                continue
            return pg.group_name, pg.size()
    names = [a for a in args if isinstance(a, str) and a not in ("sum", "avg", "max", "min", "product")]
    ints = [a for a in args[1:] if isinstance(a, int) and not isinstance(a, bool)] if sized else []
    return (names[-1] if names else None), (ints[0] if ints else None)


def mesh_dims(mesh: DeviceMesh) -> dict[str, tuple[str, int]]:
    """Process-group name -> (mesh dimension, size), preferring a dimension of size > 1 when groups coincide; the
    default group is ``world`` unless a dimension covers it."""
    dims: dict[str, tuple[str, int]] = {}
    world = dist.group.WORLD
    dims[world.group_name] = ("world", world.size())
    for name in sorted(mesh.mesh_dim_names or (), key=lambda d: mesh[d].size()):
        sub = mesh[name]
        dims[sub.get_group().group_name] = (name, sub.size())
    return dims


class CommRecorder(TorchDispatchMode):
    """Within ``with CommRecorder(mesh) as rec:`` every collective this rank issues is recorded in ``rec.ops``:
    (dimension, kind) -> {"count", "payload", "wire", "count_<dtype>"} (how many of them in each element type, e.g.
    "count_float32": gradient reductions must all be fp32)."""

    def __init__(self, mesh: DeviceMesh) -> None:
        super().__init__()
        self.dims = mesh_dims(mesh)
        self.ops: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: {"count": 0, "payload": 0, "wire": 0})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in ("c10d", "_c10d_functional"):
            self._record(func.__name__.split(".")[0], args)
        return func(*args, **kwargs)

    def _record(self, op: str, args: tuple) -> None:
        if op not in _OPS:
            return
        kind, index = _OPS[op]
        name, size = _group_of(args, sized=kind in ("all_gather", "reduce_scatter"))
        dim, mesh_size = self.dims.get(name, ("other", size or 1))
        size = size or mesh_size
        payload = _nbytes(args[index])
        if op in _FUNCTIONAL_GATHERS:
            payload *= size
        entry = self.ops[(dim, kind)]
        entry["count"] += 1
        entry["payload"] += payload
        entry["wire"] += int(wire_bytes(kind, payload, size))
        dtype = _dtype(args[index])
        if dtype:
            entry[f"count_{dtype}"] = entry.get(f"count_{dtype}", 0) + 1

    def summary(self) -> dict[str, Any]:
        """JSON-ready: wire bytes per dimension and, per "dim/kind", count and bytes."""
        per_dim: dict[str, int] = defaultdict(int)
        for (dim, _kind), e in self.ops.items():
            per_dim[dim] += e["wire"]
        return {
            "wire_bytes": dict(per_dim),
            "collectives": {f"{dim}/{kind}": dict(e) for (dim, kind), e in sorted(self.ops.items())},
        }


def gather_summaries(summary: dict[str, Any]) -> dict[str, Any]:
    """Over all ranks (a collective; call it outside the recorder): per dimension and per "dim/kind", the most any
    rank sent -- the planner's per-GPU figure. Nested dicts of numbers, fit for metrics.jsonl and W&B."""
    per_rank: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, summary)
    most: dict[str, int] = defaultdict(int)
    ops: dict[str, dict[str, int]] = defaultdict(dict)
    for s in per_rank:
        for dim, b in s["wire_bytes"].items():
            most[dim] = max(most[dim], b)
        for key, e in s["collectives"].items():
            for k, v in e.items():
                if k != "payload":
                    ops[key][k] = max(ops[key].get(k, 0), v)
    return {"comm_bytes": dict(most), "comm_ops": dict(ops)}
