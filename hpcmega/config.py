"""One typed configuration for a run: model, parallelism, training, cluster, logging, checkpoint.

Sources, lowest to highest priority: dataclass defaults -> model preset -> TOML file -> CLI overrides
(dotted keys such as ``parallel.tp``). Pure Python (no torch) so the CLI stays fast and validation is cheap.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints


class ConfigError(ValueError):
    """A configuration the user must fix; the message names the fix. The CLI exits with status 2."""


# ---------------------------------------------------------------------------------------------------------------------
# Model presets: GPT-2 style shapes. ``tiny`` is for tests and CPU demos.
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(vocab_size=256, d_model=64, n_layers=4, n_heads=4, max_seq_len=256),
    "gpt2-124m": dict(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024),
    "gpt2-350m": dict(vocab_size=50304, d_model=1024, n_layers=24, n_heads=16, max_seq_len=1024),
    "gpt-1.3b": dict(vocab_size=50304, d_model=2048, n_layers=24, n_heads=16, max_seq_len=2048),
    "gpt-7b": dict(vocab_size=50304, d_model=4096, n_layers=32, n_heads=32, max_seq_len=2048),
}

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zero-bubble", "zbv", "dualpipev")
# Schedules that place more than one stage on each pipeline rank.
MULTI_STAGE_SCHEDULES = ("interleaved-1f1b", "zero-bubble", "zbv", "dualpipev")
# zbv and dualpipev are V-shaped: exactly two stages per rank.
V_SCHEDULES = ("zbv", "dualpipev")
RANK_ORDERS = ("tp-dp-pp", "tp-pp-dp")
RECOMPUTE_MODES = ("none", "selective", "full")
PRECISIONS = ("fp32", "bf16")
WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class ModelConfig:
    preset: str = "tiny"
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    # Derived from the world size (nodes x gpus_per_node) / (tp x pp) unless given; a mismatch is an error.
    dp: int = 0
    sequence_parallel: bool = True  # only meaningful with tp > 1
    schedule: str = "1f1b"
    virtual_stages: int = 1  # stages per pipeline rank (interleaved schedules; zbv/dualpipev use 2)
    # Microbatches per step on each DP rank; 0 = derived as global_batch / (dp x micro_batch).
    microbatches: int = 0
    order: str = "tp-dp-pp"
    recompute: str = "none"
    reshard_after_forward: bool = True  # FSDP2: free gathered params after forward (ZeRO-3) or keep (ZeRO-2)
    compile: bool = False


@dataclass
class TrainConfig:
    steps: int = 20
    global_batch: int = 8  # sequences per optimizer step, independent of the layout
    micro_batch: int = 1  # sequences per microbatch on one DP rank
    seq_len: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global grad-norm clip; 0 disables
    seed: int = 0
    precision: str = "fp32"
    # "synthetic" (deterministic tokens from the seed) or an fsspec URL of shards from `hpcmega data prepare`.
    data: str = "synthetic"


@dataclass
class ClusterConfig:
    nodes: int = 1
    gpus_per_node: int = 1  # with --cpu: tasks per node
    cpu: bool = False  # gloo on CPU-only nodes (tests, local runs without GPUs)
    # Nodes per NVLink domain (1 = each node is its own domain; e.g. 18 for GB200 NVL72 trays).
    nvlink_domain_nodes: int = 1
    partition: str = ""
    account: str = ""
    qos: str = ""
    time: str = "01:00:00"  # SLURM --time, [D-]HH:MM:SS or minutes
    constraint: str = ""
    exclusive: bool = False
    job_name: str = "hpcmega"
    mem: str = ""  # e.g. "0" (all), "64G"; empty = site default
    cpus_per_task: int = 0  # 0 = site default
    sbatch_extra: list[str] = field(default_factory=list)  # passed through: ["--reservation=x", ...]
    signal_grace_s: int = 120  # SLURM sends USR2 this long before the time limit
    max_requeues: int = 3
    master_port: int = 0  # 0 = derived from the job id


@dataclass
class LoggingConfig:
    wandb: str = "offline"
    project: str = "hpcmega"
    entity: str = ""
    run_name: str = ""
    log_every: int = 1


@dataclass
class CheckpointConfig:
    url: str = ""  # fsspec URL; empty = <run_dir>/checkpoints
    save_every: int = 0  # 0 = only at the end and on preemption
    keep: int = 3
    resume: str = "auto"  # auto | none | <checkpoint URL>


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run_dir: str = ""

    # -- derived quantities -----------------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.cluster.nodes * self.cluster.gpus_per_node

    @property
    def dp(self) -> int:
        """Data-parallel degree derived from the world size (validation guarantees divisibility)."""
        return self.parallel.dp or max(1, self.world_size // max(1, self.parallel.tp * self.parallel.pp))

    @property
    def microbatches(self) -> int:
        """Microbatches per step on one DP rank (pipeline microbatches or gradient-accumulation steps)."""
        return self.parallel.microbatches or max(1, self.train.global_batch // max(1, self.dp * self.train.micro_batch))

    @property
    def stages_per_rank(self) -> int:
        if self.parallel.schedule in V_SCHEDULES:
            return 2
        if self.parallel.schedule in MULTI_STAGE_SCHEDULES:
            return max(1, self.parallel.virtual_stages)
        return 1

    @property
    def sequence_parallel(self) -> bool:
        return self.parallel.sequence_parallel and self.parallel.tp > 1

    # -- (de)serialisation ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        cfg = cls()
        _apply(cfg, data, prefix="")
        return cfg


def _section_types(obj: Any) -> dict[str, Any]:
    return get_type_hints(type(obj))


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert TOML/CLI values to the field's type, with an error that names the key."""
    try:
        if typ is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return str(value)
        if getattr(typ, "__origin__", None) is list:
            if isinstance(value, str):
                return [v for v in value.split() if v]
            return [str(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: cannot read {value!r} as {getattr(typ, '__name__', typ)}; fix the value") from None
    return value


def _apply(cfg: Config, data: dict[str, Any], prefix: str) -> None:
    types = _section_types(cfg)
    for key, value in data.items():
        if key not in types:
            valid = ", ".join(f.name for f in fields(cfg))
            raise ConfigError(f"unknown config key '{prefix}{key}'; valid keys here: {valid}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{prefix}{key}' is a section; write it as [{prefix}{key}] in TOML")
            _apply(current, value, prefix=f"{prefix}{key}.")
        else:
            setattr(cfg, key, _coerce(prefix + key, value, types[key]))


def apply_preset(cfg: Config, preset: str) -> None:
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"unknown model '{preset}'; choose one of: {', '.join(MODEL_PRESETS)}")
    cfg.model.preset = preset
    for key, value in MODEL_PRESETS[preset].items():
        setattr(cfg.model, key, value)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Resolve defaults -> preset -> TOML -> overrides. ``overrides`` maps dotted keys to values (None = unset).

    A preset named in the TOML or the overrides is applied first, so explicit model fields win over it.
    """
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found; pass an existing TOML file (see launch/)")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML ({e}); fix the file") from None
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    cfg = Config()
    preset = overrides.get("model.preset") or data.get("model", {}).get("preset") or cfg.model.preset
    apply_preset(cfg, preset)
    model_from_file = {k: v for k, v in data.get("model", {}).items() if k != "preset"}
    if overrides.get("model.preset") and overrides["model.preset"] != data.get("model", {}).get("preset"):
        model_from_file = {}  # a preset chosen on the command line replaces the file's model shape
    _apply(cfg, {**data, "model": model_from_file}, prefix="")
    for dotted, value in overrides.items():
        if dotted == "model.preset":
            continue
        *path_parts, leaf = dotted.split(".")
        nested: dict[str, Any] = {leaf: value}
        for part in reversed(path_parts):
            nested = {part: nested}
        _apply(cfg, nested, prefix="")
    return cfg
