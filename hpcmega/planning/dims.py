"""The parallel degrees of a job in one object (in the spirit of torchtitan's ``ParallelDims``): pp x dp x tp = the
world, the mesh dimensions ("pp", "dp", "tp"), every check that depends only on the degrees and the model's shape,
and the DeviceMesh built from them.

One owner: `plan`/`submit` validation (hpcmega.planning.validate), the layout (hpcmega.planning.layout) and the
engine on the ranks (hpcmega.parallel.parallelize) all ask this object, so "tp divides the heads" or "tp x pp
divides the world" is decided -- and worded -- in one place. Pure Python: torch.distributed is imported only inside
:meth:`ParallelDims.build_mesh`, which runs on a rank once torch.distributed is up.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hpcmega.config import MODEL_PRESETS
from hpcmega.errors import ConfigError

if TYPE_CHECKING:
    from hpcmega.config import Config, ModelConfig

MESH_DIMS = ("pp", "dp", "tp")


def divisors(n: int) -> list[int]:
    """The divisors of ``n``, ascending (the sizes a parallel degree may take)."""
    return [d for d in range(1, n + 1) if n % d == 0]


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def alternatives(values: list[int]) -> str:
    """'4 (or 2, 1)' from [4, 2, 1]: the value to offer in a fix, then the others."""
    values = list(values)
    if not values:
        return "?"
    return str(values[0]) + (f" (or {', '.join(map(str, values[1:]))})" if len(values) > 1 else "")


def check_tp_split(m: ModelConfig, tp: int, domain: int) -> None:
    """What tensor parallelism splits in a llama block besides the query heads: the kv heads (split, or tp a
    multiple of them: hpcmega.planning.families.kv_heads_replicated) and the SwiGLU width. The fixes offered are
    tp values that fit the NVLink ``domain`` (GPUs) and kv head counts that work with this tp."""
    if m.family != "llama":
        return
    if m.kv_heads % tp and tp % m.kv_heads:
        tps = [d for d in sorted(divisors(m.n_heads), reverse=True)
               if (d % m.kv_heads == 0 or m.kv_heads % d == 0) and domain % d == 0]
        kvs = sorted((k for k in divisors(m.n_heads) if k % tp == 0 or tp % k == 0),
                     key=lambda k: (abs(k - m.kv_heads), k))
        raise ConfigError(f"tp={tp} and n_kv_heads={m.kv_heads}: the kv heads must split evenly over tp, or tp must "
                          f"be a multiple of them (each rank's query heads then share one replicated kv head); use "
                          f"--tp {alternatives(tps)}, or --kv-heads {alternatives(kvs)}")
    if m.ffn % tp:
        raise ConfigError(f"ffn_hidden={m.ffn} is not divisible by tp={tp} (gate/up split by columns, down by rows); "
                          f"use --ffn-hidden {round_up(m.ffn, tp)}")


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp: int
    tp: int

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    @classmethod
    def split(cls, world: int, tp: int, pp: int, ranks: str, fixes: str,
              error: type[ConfigError] = ConfigError) -> ParallelDims:
        """dp = world / (tp x pp); ``error`` naming ``ranks`` (what the world is) and ``fixes`` when tp x pp does
        not divide the world."""
        if world % (tp * pp):
            raise error(f"tp={tp} x pp={pp} = {tp * pp} does not divide {ranks}; {fixes}")
        return cls(pp=pp, dp=world // (tp * pp), tp=tp)

    @classmethod
    def from_mesh(cls, mesh: Any) -> ParallelDims:
        """The degrees of a built ("pp", "dp", "tp") DeviceMesh."""
        return cls(**{name: mesh[name].size() for name in MESH_DIMS})

    def check_model(self, cfg: Config) -> None:
        """What tensor parallelism splits must split evenly: attention heads, the vocabulary and position rows of
        the vocab-parallel embeddings, and (sequence parallel) the sequence."""
        m, tp = cfg.model, self.tp
        domain = cfg.cluster.gpus_per_node * cfg.cluster.nvlink_domain_nodes
        if m.n_heads % tp:
            fits = alternatives([d for d in sorted(divisors(m.n_heads), reverse=True) if domain % d == 0])
            models = [f"{name} ({shape['n_heads']} heads)" for name, shape in MODEL_PRESETS.items()
                      if shape["n_heads"] % tp == 0 and shape["vocab_size"] % tp == 0]
            alt = f", or a model whose head count divides by {tp}: --model {', '.join(models)}" if models else \
                f", or --heads {round_up(m.n_heads, tp)}"
            raise ConfigError(f"tp={tp} does not divide n_heads={m.n_heads} of model '{m.preset}' (each TP rank "
                              f"needs whole attention heads); use --tp {fits}{alt}")
        if m.vocab_size % tp:
            raise ConfigError(f"vocab_size={m.vocab_size} is not divisible by tp={tp} (the vocab-parallel embedding "
                              f"splits its rows evenly); use --vocab-size {round_up(m.vocab_size, tp)}")
        check_tp_split(m, tp, domain)
        if m.family == "gpt2" and m.max_seq_len % tp:
            raise ConfigError(f"model.max_seq_len={m.max_seq_len} is not divisible by tp={tp} (the position "
                              f"embedding splits its rows evenly); use --set model.max_seq_len="
                              f"{round_up(m.max_seq_len, tp)}")
        if cfg.parallel.sequence_parallel and tp > 1 and cfg.train.seq_len % tp:
            raise ConfigError(f"seq_len={cfg.train.seq_len} is not divisible by tp={tp} with sequence parallel "
                              f"(each TP rank keeps seq_len/tp positions); use --seq-len "
                              f"{round_up(cfg.train.seq_len, tp)} or --no-sequence-parallel")

    def check_data_parallel(self, mode: str) -> None:
        """replicate is plain DDP: with TP or PP it silently drops or desynchronises DTensor parameters."""
        if mode == "replicate" and (self.tp > 1 or self.pp > 1):
            raise ConfigError(f"parallel.data_parallel=replicate needs tp=1 and pp=1 (got tp={self.tp}, "
                              f"pp={self.pp}); use --data-parallel fsdp with tensor or pipeline parallelism")

    def build_mesh(self, device_type: str, grid: list[list[list[int]]] | None = None) -> Any:
        """The ("pp", "dp", "tp") DeviceMesh: over ``grid`` (``Layout.mesh_grid()``: [pp][dp][tp] -> global rank),
        or over ranks in order when no grid is given."""
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

        if grid is None:
            return init_device_mesh(device_type, (self.pp, self.dp, self.tp), mesh_dim_names=MESH_DIMS)
        return DeviceMesh(device_type, grid, mesh_dim_names=MESH_DIMS)
