"""The headline command as typed, and the defaults a GPU user expects (issue 7, items 1 and 2).

Unset values are resolved by one rule (config.resolve_defaults): GPUs per node from the flag, the config, the
partition's GRES (sinfo), else 8; bf16 and selective recompute for GPU jobs, fp32 and none for CPU jobs; seq_len and
batch from the model preset. An explicit value always wins, and `plan` says what it chose and why.
"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from hpcmega.cli import main
from hpcmega.config import PRESET_TRAIN, Config, load_config, resolve_defaults
from hpcmega.cluster.slurm import gres_gpus, partition_gpus

HEADLINE = ["--nodes", "4", "--tp", "8", "--pp", "2"]


def invoke(args: list[str]):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result.output


def chosen(data: dict) -> dict[str, dict]:
    return {c["key"]: c for c in data["config"]["chosen"]}


def test_headline_plan_as_typed_uses_8_gpus_per_node_bf16_and_selective_recompute():
    data = json.loads(invoke(["plan", *HEADLINE, "--json"]))
    assert (data["world_size"], data["tp"], data["pp"], data["dp"]) == (32, 8, 2, 2)
    picked = chosen(data)
    assert picked["cluster.gpus_per_node"]["value"] == 8
    # the dev cluster's partition has no GRES: the plan says the 8 is the GPU-job default, and how to change it
    assert "default" in picked["cluster.gpus_per_node"]["source"]
    assert "--gpus-per-node" in picked["cluster.gpus_per_node"]["source"]
    assert data["config"]["precision"] == "bf16" and data["config"]["recompute"] == "selective"
    assert "--precision fp32" in picked["train.precision"]["source"]


def test_headline_plan_with_gpus_per_node_flag_says_so():
    data = json.loads(invoke(["plan", "--nodes", "4", "--gpus-per-node", "8", "--tp", "8", "--pp", "2", "--json"]))
    assert data["world_size"] == 32
    assert chosen(data)["cluster.gpus_per_node"]["source"] == "from flag --gpus-per-node"


def test_plan_table_prints_what_was_chosen_and_why():
    out = invoke(["plan", *HEADLINE])
    assert "precision bf16 (GPU job default; --precision fp32 to change)" in out
    assert "recompute selective (GPU job default; --recompute none or full to change)" in out
    assert "seq_len 64 (model tiny's default; --seq-len to change)" in out


def test_headline_submit_dry_run_script_and_plan(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = invoke(["submit", *HEADLINE, "--dry-run"])
    for line in ("#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --nodes=4"):
        assert line in out, line
    assert "precision=bf16" in out and "recompute=selective" in out
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_explicit_values_win_over_the_gpu_defaults():
    data = json.loads(invoke(["plan", *HEADLINE, "--precision", "fp32", "--recompute", "none", "--seq-len", "32",
                              "--json"]))
    assert (data["config"]["precision"], data["config"]["recompute"], data["config"]["seq_len"]) == \
        ("fp32", "none", 32)
    assert not {"train.precision", "parallel.recompute", "train.seq_len"} & set(chosen(data))


def test_config_file_gpus_per_node_wins_over_gres_and_default(tmp_path):
    site = tmp_path / "site.toml"
    site.write_text("[cluster]\ngpus_per_node = 4\n")
    data = json.loads(invoke(["plan", "--config", str(site), "--nodes", "2", "--tp", "4", "--json"]))
    assert data["world_size"] == 8
    assert chosen(data)["cluster.gpus_per_node"]["source"] == f"from {site}"


def test_cpu_jobs_keep_fp32_no_recompute_and_tasks_per_node():
    data = json.loads(invoke(["plan", "--cpu", "--nodes", "2", "--json"]))
    assert (data["world_size"], data["config"]["precision"], data["config"]["recompute"]) == (2, "fp32", "none")
    data = json.loads(invoke(["plan", "--cpu", "--nodes", "2", "--gpus-per-node", "2", "--json"]))
    assert data["world_size"] == 4


def test_default_batch_is_rounded_up_to_whole_microbatches_per_dp_rank():
    data = json.loads(invoke(["plan", "--nodes", "2", "--pp", "2", "--json"]))  # dp = 16 / 2 = 8
    assert data["config"]["global_batch"] == 16 and data["config"]["microbatches"] == 2
    assert "rounded up" in chosen(data)["train.global_batch"]["source"]


def test_resolution_is_idempotent_and_follows_the_device():
    cfg = Config()
    first = resolve_defaults(cfg, on_gpu=False)
    assert {c.key for c in first} >= {"train.precision", "parallel.recompute", "train.seq_len"}
    assert (cfg.train.precision, cfg.parallel.recompute) == ("fp32", "none")
    assert resolve_defaults(cfg, on_gpu=True) == []  # nothing left unset: a second call changes nothing
    assert cfg.train.precision == "fp32"


@pytest.mark.parametrize("preset, seq_len", [("gpt2-124m", 1024), ("gpt2-350m", 1024), ("gpt-1.3b", 2048),
                                             ("gpt-7b", 2048)])
def test_presets_carry_their_own_seq_len_and_batch(preset, seq_len):
    cfg = load_config(None, {"model.preset": preset})
    resolve_defaults(cfg)
    assert cfg.train.seq_len == seq_len == cfg.model.max_seq_len
    assert cfg.train.global_batch == PRESET_TRAIN[preset]["global_batch"]
    assert cfg.train.global_batch * seq_len >= 2**19  # at least ~0.5M tokens per step


def test_gres_parsing():
    assert gres_gpus("gpu:8") == 8
    assert gres_gpus("gpu:h100:8(S:0-1)") == 8
    assert gres_gpus("gpu:a100:4,shard:8") == 4
    assert gres_gpus("(null)") is None and gres_gpus("") is None and gres_gpus("shard:2") is None


@pytest.mark.slurm
def test_dev_cluster_partition_reports_no_gpus():
    """The dev cluster's nodes have no GRES: sinfo answers, and the answer is 'no GPUs' (default 8 applies)."""
    import subprocess

    assert "debug" in subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout
    assert partition_gpus() is None
    assert partition_gpus("no-such-partition") is None
