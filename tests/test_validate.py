"""validate(cfg): every config that cannot run is refused with one line that names the fix."""
from __future__ import annotations

from pathlib import Path

import pytest

from hpcmega.config import MODEL_PRESETS, Config, load_config, resolve_defaults
from hpcmega.errors import ConfigError
from hpcmega.cluster.sbatch import parse_slurm_time
from hpcmega.planning.validate import validate

REPO = Path(__file__).resolve().parents[1]


def make(**dotted) -> Config:
    """A config from dotted keys written as a__b (a known model preset applied first, unset values resolved as for
    a GPU job; values then set as given, so invalid ones reach validate() the way a hand-edited TOML would)."""
    values = {k.replace("__", "."): v for k, v in dotted.items()}
    cfg = load_config(None, {"model.preset": values.pop("model.preset")} if "model.preset" in values
                      and values["model.preset"] in MODEL_PRESETS else {})
    resolve_defaults(cfg)
    for key, value in values.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


def refused(cfg: Config) -> str:
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


def test_defaults_and_headline_plan_are_valid():
    gpu, cpu = Config(), Config()
    cpu.cluster.cpu = True
    for cfg in (gpu, cpu):
        resolve_defaults(cfg)
        assert validate(cfg) == []
    assert validate(make(cluster__nodes=4, cluster__gpus_per_node=8, parallel__tp=8, parallel__pp=2,
                         model__preset="gpt-7b")) == []


@pytest.mark.parametrize("name", ["ci-2node-cpu.toml", "gpt2-124m-4node.toml", "gpt-7b-16node.toml"])
def test_shipped_cluster_configs_are_valid(name):
    cfg = load_config(REPO / "launch" / name)
    resolve_defaults(cfg)
    validate(cfg)


def test_tp_wider_than_a_node_message_is_exact():
    msg = refused(make(cluster__nodes=2, cluster__gpus_per_node=4, parallel__tp=8))
    assert msg == "tp=8 does not divide gpus_per_node=4: a TP group would cross a node; use --tp 4 (or 2, 1)"


def test_nvlink_domain_of_several_nodes_allows_wider_tp():
    base = dict(cluster__nodes=4, cluster__gpus_per_node=4, parallel__tp=16, model__preset="gpt-7b")
    msg = refused(make(**base, cluster__nvlink_domain_nodes=2))
    assert "NVLink domain of 2 nodes x 4 GPUs = 8" in msg and "--tp 8 (or 4, 2, 1)" in msg
    assert validate(make(**base, cluster__nvlink_domain_nodes=4)) == []


def test_tp_not_dividing_heads_points_to_models_that_fit():
    msg = refused(make(cluster__nodes=4, cluster__gpus_per_node=8, parallel__tp=8, parallel__pp=2, model__n_heads=4))
    assert "n_heads=4" in msg and "--tp 4 (or 2, 1)" in msg and "--model" in msg and "gpt-7b (32 heads)" in msg
    assert "gpt2-124m" not in msg  # 12 heads do not split 8 ways


def test_default_model_takes_every_tp_and_pp_of_8_gpu_nodes():
    for tp in (1, 2, 4, 8):
        for pp in (1, 2, 4):
            assert validate(make(cluster__nodes=4, cluster__gpus_per_node=8, parallel__tp=tp, parallel__pp=pp,
                                 train__global_batch=32)) is not None, (tp, pp)
    two_stages = make(cluster__nodes=4, cluster__gpus_per_node=8, parallel__tp=8, parallel__pp=4,
                      parallel__schedule="interleaved-1f1b", parallel__virtual_stages=2, train__global_batch=8)
    assert validate(two_stages) == []


def test_world_size_error_names_the_gpus_per_node_fix():
    """The headline layout on nodes configured with one GPU: the likeliest fix is the node's real GPU count."""
    msg = refused(make(cluster__nodes=4, cluster__gpus_per_node=1, parallel__tp=8, parallel__pp=2))
    assert "does not divide the world size 4" in msg and "--gpus-per-node 8" in msg
    assert "--nodes 16 (a multiple of 16)" in msg  # the other fix, second
    assert msg.index("--gpus-per-node 8") < msg.index("--nodes 16")


NODE4 = dict(cluster__nodes=1, cluster__gpus_per_node=4)


@pytest.mark.parametrize(
    "dotted, words",
    [
        # world / parallel sizes
        (dict(**NODE4, parallel__pp=3), ["tp=1 x pp=3 = 3", "world size 4", "1, 2, 4", "--nodes 3 (a multiple of 3)"]),
        (dict(cluster__nodes=2, cluster__gpus_per_node=4, parallel__tp=2, parallel__dp=3),
         ["parallel.dp=3", "= 4", "drop --dp", "--dp 4"]),
        (dict(cluster__nodes=3, cluster__gpus_per_node=1, parallel__pp=3), ["n_layers=8", "3", "--layers 9"]),
        (dict(cluster__nodes=1, cluster__gpus_per_node=2, parallel__pp=2, parallel__schedule="interleaved-1f1b",
              parallel__virtual_stages=2, model__n_layers=6), ["n_layers=6", "pp=2 x 2 stage(s)", "--layers 8"]),
        (dict(cluster__nodes=1, cluster__gpus_per_node=2, parallel__tp=2, model__vocab_size=255),
         ["vocab_size=255", "--vocab-size 256"]),
        (dict(**NODE4, parallel__tp=4, train__seq_len=30), ["seq_len=30", "--seq-len 32", "--no-sequence-parallel"]),
        (dict(train__seq_len=512), ["max_seq_len=256", "--seq-len 256"]),
        (dict(model__d_model=66), ["d_model=66", "n_heads=8", "--d-model 72"]),
        # model families: llama's grouped-query attention, RoPE and tied head; GPT-2 refuses llama settings
        (dict(model__preset="llama-tiny", model__n_kv_heads=3), ["n_kv_heads=3", "n_heads=8", "--kv-heads 2"]),
        (dict(model__preset="llama-tiny", model__n_kv_heads=3, model__n_heads=12, model__d_model=96, **NODE4,
              parallel__tp=2), ["tp=2 and n_kv_heads=3", "--tp 1,", "--kv-heads 2 (or 4, 1, 6, 12)"]),
        (dict(model__preset="llama-tiny", model__n_kv_heads=6, model__n_heads=12, model__d_model=96,
              cluster__nodes=1, cluster__gpus_per_node=8, parallel__tp=4),  # tp 6 or 3 would not fit 8-GPU nodes
         ["tp=4 and n_kv_heads=6", "--tp 2 (or 1)", "--kv-heads 4 (or 2, 1, 12)"]),
        (dict(model__preset="llama-tiny", model__d_model=40, model__n_heads=8), ["head size", "odd", "--d-model 48"]),
        (dict(model__preset="llama-tiny", model__tie_embeddings=True, cluster__nodes=1, cluster__gpus_per_node=2,
              parallel__pp=2), ["tie_embeddings", "pp=2", "--no-tie-embeddings"]),
        (dict(model__preset="llama-tiny", model__ffn_hidden=383, cluster__nodes=1, cluster__gpus_per_node=2,
              parallel__tp=2), ["ffn_hidden=383", "--ffn-hidden 384"]),
        (dict(model__n_kv_heads=2), ["model.n_kv_heads=2", "llama-family", "--family llama"]),
        (dict(model__qkv_bias=True), ["model.qkv_bias=True", "--family llama"]),
        (dict(model__rope_scaling=8.0), ["model.rope_scaling=8.0", "--family llama"]),
        (dict(model__preset="llama-tiny", model__rope_scaling=8.0, model__rope_high_freq_factor=1.0),
         ["rope_high_freq_factor=1.0 must exceed", "rope_low_freq_factor=1.0", "e.g. 4 and 1"]),
        (dict(model__family="mamba"), ["unknown model.family", "gpt2, llama"]),
        # batch and microbatches
        (dict(**NODE4, train__global_batch=6), ["global_batch=6", "dp=4", "--global-batch 8"]),
        (dict(cluster__nodes=1, cluster__gpus_per_node=2, parallel__pp=2, parallel__microbatches=3),
         ["parallel.microbatches=3", "= 8", "drop --microbatches", "--global-batch 3"]),
        (dict(**NODE4, parallel__pp=4, train__global_batch=2), ["microbatches=2 < 4", "--global-batch 4"]),
        (dict(**NODE4, parallel__pp=4, parallel__schedule="interleaved-1f1b", parallel__virtual_stages=2,
              model__n_layers=8, train__global_batch=6), ["interleaved-1f1b", "multiple of pp=4", "--global-batch 8"]),
        (dict(**NODE4, parallel__pp=4, parallel__schedule="zero-bubble", model__n_layers=8, train__global_batch=6),
         ["zero-bubble", "multiple of pp=4"]),
        (dict(cluster__nodes=1, cluster__gpus_per_node=2, parallel__pp=2, parallel__schedule="dualpipev",
              train__global_batch=2), ["dualpipev", "2 x pp", "--global-batch 4"]),
        # data parallel mode: replicate is plain DDP, which TP/PP parameters break silently
        (dict(**NODE4, parallel__tp=2, parallel__data_parallel="replicate"),
         ["data_parallel=replicate needs tp=1 and pp=1", "tp=2", "--data-parallel fsdp"]),
        (dict(**NODE4, parallel__pp=2, parallel__data_parallel="replicate"), ["pp=2", "--data-parallel fsdp"]),
        (dict(parallel__data_parallel="ddp"), ["unknown parallel.data_parallel", "fsdp, replicate"]),
        # schedules and virtual stages
        (dict(cluster__nodes=1, cluster__gpus_per_node=2, parallel__pp=2, parallel__schedule="zbv",
              parallel__virtual_stages=3), ["zbv", "exactly 2 stages", "--virtual-stages 2"]),
        (dict(cluster__nodes=1, cluster__gpus_per_node=2, parallel__pp=2, parallel__virtual_stages=2),
         ["virtual_stages=2", "--schedule interleaved-1f1b", "--virtual-stages 1"]),
        (dict(parallel__schedule="gpipe", parallel__virtual_stages=2), ["--schedule interleaved-1f1b"]),
        # unknown names
        (dict(parallel__schedule="zigzag"), ["unknown parallel.schedule (--schedule) 'zigzag'", "1f1b"]),
        (dict(parallel__order="pp-dp-tp"), ["unknown parallel.order", "tp-dp-pp, tp-pp-dp"]),
        (dict(parallel__recompute="some"), ["unknown parallel.recompute", "selective"]),
        (dict(train__precision="fp16"), ["unknown train.precision", "bf16"]),
        (dict(logging__wandb="cloud"), ["unknown logging.wandb", "offline"]),
        (dict(model__preset="gpt-9000"), ["unknown model.preset (--model)", "gpt-7b"]),
        # nonsense numbers
        (dict(train__lr=0.0), ["train.lr (--lr)=0.0", "positive"]),
        (dict(train__lr=float("nan")), ["train.lr", "positive"]),
        (dict(train__min_lr=0.01, train__lr=0.001), ["min_lr", "min_lr <= lr"]),
        (dict(train__beta2=1.0), ["beta2", "[0, 1)"]),
        (dict(checkpoint__keep=0), ["checkpoint.keep (--keep)=0", "positive"]),
        (dict(checkpoint__save_every=-1), ["checkpoint.save_every (--save-every)=-1", "0 or more"]),
        (dict(parallel__dp=-2), ["parallel.dp", "0 = derived"]),
        (dict(train__steps=2.5), ["train.steps", "integer"]),
        # cluster
        (dict(cluster__time="soon"), ["cluster.time='soon'", "HH:MM:SS"]),
        (dict(cluster__time="00:01:00"), ["signal_grace_s=120", "raise cluster.time"]),
        (dict(cluster__mem="lots"), ["cluster.mem", "64G"]),
        (dict(cluster__sbatch_extra=["reservation=x"]), ["--reservation=x"]),
        (dict(cluster__job_name="my job"), ["job_name", "without spaces"]),
        (dict(cluster__master_port=70000), ["master_port", "65535"]),
    ],
)
def test_bad_configs_are_refused_with_the_fix(dotted, words):
    msg = refused(make(**dotted))
    for word in words:
        assert word in msg, (word, msg)


@pytest.mark.parametrize(
    "key",
    ["model__vocab_size", "model__d_model", "model__n_layers", "model__n_heads", "model__max_seq_len",
     "parallel__tp", "parallel__pp", "parallel__virtual_stages", "train__steps",
     "cluster__nodes", "cluster__nvlink_domain_nodes", "logging__log_every", "checkpoint__keep"],
)
@pytest.mark.parametrize("value", [0, -3])
def test_counts_and_sizes_must_be_positive(key, value):
    msg = refused(make(**{key: value}))
    assert key.replace("__", ".") in msg and "must be positive" in msg


@pytest.mark.parametrize("key", ["train__global_batch", "train__micro_batch", "train__seq_len",
                                 "cluster__gpus_per_node"])
def test_sizes_resolved_by_rule_are_never_negative_or_left_unset(key):
    """0 means "resolved by rule" (config.resolve_defaults); a config that skipped resolution is refused too."""
    assert "0 or more" in refused(make(**{key: -3}))
    assert "resolve_defaults() must run before validate()" in refused(make(**{key: 0}))


@pytest.mark.parametrize("key", ["parallel__microbatches", "train__warmup_steps", "train__seed",
                                 "checkpoint__save_every", "cluster__signal_grace_s", "cluster__max_requeues"])
def test_zero_allowed_but_not_negative(key):
    assert validate(make(**{key: 0})) is not None
    assert "0 or more" in refused(make(**{key: -1}))


def test_fixes_suggested_by_messages_make_the_config_valid():
    """Following the advice of a message gives a config that passes (for the arithmetic fixes)."""
    assert validate(make(**NODE4, train__global_batch=8)) == []
    assert validate(make(**NODE4, parallel__tp=4, train__seq_len=32)) == []
    assert validate(make(**NODE4, parallel__tp=2, parallel__data_parallel="fsdp")) == []
    assert validate(make(**NODE4, parallel__data_parallel="replicate", train__global_batch=8)) == []
    assert validate(make(**NODE4, parallel__tp=4, train__seq_len=30, parallel__sequence_parallel=False)) == []
    assert validate(make(cluster__nodes=3, cluster__gpus_per_node=1, parallel__pp=3, model__n_layers=6,
                         train__global_batch=6)) == []
    cfg = make(**NODE4, parallel__pp=4, parallel__schedule="interleaved-1f1b", parallel__virtual_stages=2,
               model__n_layers=8, train__global_batch=8)
    assert validate(cfg) == []


def test_warnings_for_configs_that_run_badly():
    bubble = validate(make(cluster__nodes=1, cluster__gpus_per_node=4, parallel__pp=4, train__global_batch=4))
    assert any("bubble ~43%" in w for w in bubble)  # (p-1)/(m+p-1) = 3/7
    assert any("warmup_steps=30 >= steps=20" in w for w in validate(make(train__warmup_steps=30)))
    assert any("virtual_stages=1" in w for w in validate(
        make(cluster__nodes=1, cluster__gpus_per_node=2, parallel__pp=2, parallel__schedule="interleaved-1f1b")))


@pytest.mark.parametrize(
    "text, minutes",
    [("90", 90), ("1:30", 2), ("00:00:30", 1), ("01:00:00", 60), ("48:00:00", 2880), ("2-00:00:00", 2880),
     ("1-12", 2160), ("1-1:30", 1530), ("0-00:10:00", 10), (" 15 ", 15)],
)
def test_parse_slurm_time(text, minutes):
    assert parse_slurm_time(text) == minutes


@pytest.mark.parametrize("text", ["", "abc", "1:2:3:4", "01:61:00", "10:75", "1-25", "-5", "1h", "0", "00:00:00",
                                  "UNLIMITED"])
def test_parse_slurm_time_refuses(text):
    with pytest.raises(ConfigError, match="cluster.time"):
        parse_slurm_time(text)


@pytest.mark.parametrize("preset", ["llama-tiny", "llama3.2-1b", "llama3-8b", "llama3-70b"])
def test_llama_presets_take_every_tp_of_an_8_gpu_node(preset):
    """tp 1-8 over 8 (or 2, for llama-tiny) kv heads: split when tp divides them, replicated beyond."""
    for tp in (1, 2, 4, 8):
        assert validate(make(model__preset=preset, cluster__nodes=1, cluster__gpus_per_node=8, parallel__tp=tp)) \
            is not None
