"""Nothing trains on garbage (issue 19, data): a damaged index is refused by the pre-flight before anything is
written, and a shard whose bytes do not match the index, or that holds ids beyond the vocabulary, stops the run
with one line naming the shard before a step is taken on it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import run_cli

from hpcmega.cli import main
from hpcmega.config import load_config
from hpcmega.data.index import DataError
from hpcmega.data.loader import TokenShardLoader
from hpcmega.data.prepare import prepare

RUN = ["run", "--nproc", "1", "--cpu", "--wandb", "disabled", "--vocab-size", "50304", "--seq-len", "16",
       "--global-batch", "2", "--layers", "1", "--steps", "1"]


@pytest.fixture
def dataset(tmp_path) -> Path:
    (tmp_path / "t.txt").write_text("To be, or not to be, that is the question.\n" * 200)
    prepare(str(tmp_path / "t.txt"), str(tmp_path / "ds"), shard_tokens=1024, val_fraction=0.05, workers=1)
    return tmp_path / "ds"


def _edit_index(ds: Path, edit) -> None:
    index = json.loads((ds / "index.json").read_text())
    edit(index)
    (ds / "index.json").write_text(json.dumps(index))


def _fill_ff(shard: Path) -> None:
    shard.write_bytes(b"\xff" * shard.stat().st_size)  # token 65535 everywhere: same size, beyond GPT-2's vocab


@pytest.mark.parametrize("damage,extra,words", [
    (lambda ds, ix: (ds / ix["shards"][1]["file"]).unlink(), [], ["shard-00001.bin", "is missing"]),
    (lambda ds, ix: (ds / ix["shards"][0]["file"]).write_bytes(b"\0" * 10), [], ["shard-00000.bin has 10 bytes"]),
    (lambda ds, ix: _edit_index(ds, lambda i: i["shards"][0].update(tokens="many")), [],
     ["tokens of shard-00000.bin='many'", "--force"]),
    (lambda ds, ix: _edit_index(ds, lambda i: i.update(vocab_size="50257")), [], ["vocab_size='50257'"]),
    (lambda ds, ix: _edit_index(ds, lambda i: i["shards"][0].update(file="../../etc/passwd")), [],
     ["without a plain shard file name"]),
    (lambda ds, ix: (ds / "index.json").write_text("[1, 2"), [], ["index.json is not a JSON object"]),
    (lambda ds, ix: _edit_index(ds, lambda i: i.update(val_shards=[])), ["--eval-every", "5"], ["no val split"]),
    (lambda ds, ix: None, ["--seq-len", "256", "--eval-every", "5"], ["val split", "fewer than one sequence of 257"]),
])
def test_a_damaged_index_is_refused_before_anything_is_written(dataset, tmp_path, damage, extra, words):
    damage(dataset, json.loads((dataset / "index.json").read_text()))
    out = CliRunner().invoke(main, [*RUN, "--data", str(dataset), *extra, "--run-dir", str(tmp_path / "run")])
    assert out.exit_code == 2, out.output
    assert all(w in out.stderr for w in words) and "Traceback" not in out.output, out.stderr
    assert not (tmp_path / "run").exists()


def _loader(ds: Path) -> TokenShardLoader:
    return TokenShardLoader(load_config(overrides={"train.data": str(ds), "model.vocab_size": 50304,
                                                   "train.seq_len": 16, "train.global_batch": 64}))


def test_a_shard_is_checked_when_first_opened(dataset):
    index = json.loads((dataset / "index.json").read_text())
    shard = dataset / index["shards"][1]["file"]
    _fill_ff(shard)
    with pytest.raises(DataError, match=f"data shard {shard} does not match its sha256 in index.json"):
        _loader(dataset).global_batch(0)  # 64 windows: every shard is read
    # the index "fixed" to the garbage's hash: the ids themselves are refused
    _edit_index(dataset, lambda i: i["shards"][1].update(sha256=hashlib.sha256(shard.read_bytes()).hexdigest()))
    with pytest.raises(DataError, match=f"data shard {shard} holds token id 65535, beyond the vocabulary of 50257"):
        _loader(dataset).global_batch(0)


@pytest.mark.slow
def test_a_damaged_shard_stops_a_tp2_run_before_a_step(dataset, tmp_path):
    shard = dataset / json.loads((dataset / "index.json").read_text())["shards"][0]["file"]
    _fill_ff(shard)
    run_dir = tmp_path / "run"
    result = run_cli(["run", "--nproc", "2", "--tp", "2", *RUN[3:], "--data", dataset, "--global-batch", "64",
                      "--steps", "5", "--run-dir", run_dir], cwd=tmp_path, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert f"data shard {shard} does not match its sha256" in out and "Traceback" not in out, out
    assert not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text().strip()
