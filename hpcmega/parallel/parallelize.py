"""Build the model parts this rank owns, parallelized in the one order that is correct:

stage split -> tensor/sequence parallel -> activation recompute -> torch.compile per block -> FSDP2,
all on the meta device, then ``to_empty`` on the real device and initialisation of each local shard.

Initialising after sharding is what lets a large model start: a rank never holds more than its own shards plus
the full value of one parameter while it is drawn (the largest: the embedding or the head), instead of its whole
unsharded stage in fp32 (GPT-3 175B at pp=8: 175e9 / 8 x 4 bytes = 88 GB). The values are those of the
single-process model (drawn per parameter name, see hpcmega.models.gpt2.model), so every layout starts from the same
weights.

(The ``PipelineStage`` wrappers and the schedule come after, in :mod:`hpcmega.parallel.pipeline`.) FSDP2 must come
after TP (it shards the TP-sharded DTensors again over "dp"); DDP or the DDP-based composable ``replicate`` must
never be used with TP or PP here: they silently drop or desynchronise DTensor parameters.

``parallel.data_parallel = "replicate"`` (tp = pp = 1 only; hpcmega.planning.validate refuses the rest) keeps a full copy
of the model on every dp rank: plain ``DistributedDataParallel`` around the one part, gradients all-reduced once per
step in buckets that overlap backward. Chosen over FSDP2-based replication (``fully_shard`` on a (replicate, 1) mesh)
by measurement (docs/performance.md): parameters stay plain tensors, so the optimizer, clipping and forward pay no
DTensor dispatch. The part itself stays the bare model (DDP holds it, ``ModelParts.forward_module`` is the wrapper), so
parameter names, the optimizer and DCP checkpoints are those of every other layout. bf16 under replicate is
``torch.autocast``: fp32 parameters, gradients, all-reduce and optimizer state, bf16 matmuls.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from hpcmega.config import Config
from hpcmega.errors import ConfigError
from hpcmega.parallel.grad_sync import mark_partial_grads
from hpcmega.parallel.recompute import apply_recompute
from hpcmega.planning.dims import ParallelDims
from hpcmega.planning.stages import layers_for_stage, stage_ids_for_rank
from hpcmega.models import family_module
from hpcmega.models.common import new_model
from hpcmega.planning.validate import check_family, check_seq_len


@dataclass
class ModelParts:
    """What one rank holds: one module per owned pipeline stage (a single part when pp = 1)."""

    parts: list[nn.Module]
    stage_ids: list[int]
    num_stages: int
    fsdp: bool
    device: torch.device
    layers: list[range] = field(default_factory=list)
    reshard_after_forward: bool = True  # FSDP2's setting (hpcmega.config.Config.reshard_after_forward)
    reduce_every_microbatch: bool = False  # pp = 1 accumulation (hpcmega.config.Config.reduce_every_microbatch)
    replicated: DistributedDataParallel | None = None  # data_parallel = replicate: the DDP wrapper of parts[0]
    autocast: torch.dtype | None = None  # bf16 without FSDP2's mixed-precision policy (replicate)

    @property
    def forward_module(self) -> nn.Module:
        """What a pp = 1 step calls: the DDP wrapper under replicate (it reduces gradients), else the part."""
        return self.replicated or self.parts[0]

    def compute_context(self):
        """Where forward and loss run: autocast to bf16 under replicate + bf16, nothing otherwise."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    @property
    def has_first_stage(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last_stage(self) -> bool:
        return self.num_stages - 1 in self.stage_ids

    def parameters(self):
        for part in self.parts:
            yield from part.parameters()

    def named_parameters(self):
        """Full-model names: the same parameter has the same name in every layout."""
        for part in self.parts:
            yield from part.named_parameters()


def check_shapes(cfg: Config, dims: ParallelDims, num_stages: int) -> None:
    """Shapes that tensor/sequence/pipeline parallelism cannot split (the degrees' own rules: ParallelDims), so a
    bad run fails in one line."""
    dims.check_model(cfg)
    dims.check_data_parallel(cfg.parallel.data_parallel)
    check_seq_len(cfg)
    m = cfg.model
    if m.n_layers < num_stages:
        raise ConfigError(
            f"model.n_layers={m.n_layers} is fewer than the {num_stages} pipeline stages; "
            "lower parallel.pp / parallel.virtual_stages or add layers"
        )
    check_family(m, num_stages)


def build_model_parts(cfg: Config, mesh: DeviceMesh, device: torch.device,
                      allocation: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                      fill: bool = True) -> ModelParts:
    """``allocation``: the context in which the shards are allocated and initialised (``plan --measure`` passes a
    ``FakeTensorMode``: shapes without storage); the stage split, TP and FSDP2 wrapping happen on meta outside it.
    ``fill=False`` leaves the shards' values unset: fake tensors hold none, and the tiled initialisation works out
    each shard's offsets with real index tensors, which a fake mode cannot read."""
    dims = ParallelDims.from_mesh(mesh)
    pp, dp, tp = dims.pp, dims.dp, dims.tp
    stages_per_rank = cfg.stages_per_rank if pp > 1 else 1
    num_stages = pp * stages_per_rank
    check_shapes(cfg, dims, num_stages)
    stage_ids = stage_ids_for_rank(mesh["pp"].get_local_rank(), pp, stages_per_rank, cfg.parallel.schedule)
    replicate = cfg.parallel.data_parallel == "replicate"
    # FSDP2 also carries the bf16 mixed-precision policy (replicate uses autocast instead, see the module docstring)
    use_fsdp = not replicate and (dp > 1 or cfg.train.precision == "bf16")
    reshard = cfg.reshard_after_forward  # auto: off under PP; always off for split-backward schedules (see there)

    parts, layers = [], []
    for stage in stage_ids:
        stage_layers = layers_for_stage(stage, num_stages, cfg.model.n_layers)
        with torch.device("meta"):  # shapes only: nothing is allocated until to_empty, after sharding
            model = new_model(cfg.model)
        model.keep_only(stage_layers, first=stage == 0, last=stage == num_stages - 1)
        if tp > 1:
            tensor_parallel = family_module(cfg.model.family, "parallelize").apply_tensor_parallel
            tensor_parallel(model, mesh["tp"], cfg.parallel.sequence_parallel)
        apply_recompute(model, cfg.parallel.recompute)
        if cfg.parallel.compile:
            for block in model.blocks.values():
                block.compile()
        if use_fsdp:
            apply_fsdp(model, mesh["dp"], cfg.train.precision, reshard)
        with allocation():
            model.to_empty(device=device)  # allocates this rank's shards only
            if fill:
                model.init_weights(cfg.train.seed)  # each local shard = its slice of the layout-independent full value
        mark_partial_grads(model)  # on the final parameter objects (FSDP2 and to_empty replace them)
        parts.append(model)
        layers.append(stage_layers)
    bf16 = torch.bfloat16 if replicate and cfg.train.precision == "bf16" else None
    with allocation():
        ddp = replicate_module(parts[0], mesh["dp"]) if replicate and dp > 1 else None
    return ModelParts(parts, stage_ids, num_stages, use_fsdp, device, layers, reshard, cfg.reduce_every_microbatch,
                      ddp, bf16)


def replicate_module(model: nn.Module, dp_mesh: DeviceMesh) -> DistributedDataParallel:
    """Plain DDP over "dp". Every rank initialised the same full weights (drawn per name from the seed), so the
    initial broadcast is skipped. Gradients end each backward as views into DDP's buckets; during backward
    autograd's own gradients sit next to the buckets until copied in (one more fp32 copy at the peak, which the
    planner counts and ``plan --measure`` confirms)."""
    return DistributedDataParallel(model, process_group=dp_mesh.get_group(), init_sync=False,
                                   gradient_as_bucket_view=True)


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, precision: str, reshard_after_forward: bool) -> None:
    """FSDP2 over "dp": one unit per block plus the root (embeddings, final norm, head). With bf16, parameters are
    cast for compute while master weights, optimizer state and gradient reduction stay fp32."""
    if precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    for block in model.blocks.values():
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
