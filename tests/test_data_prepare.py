"""`data prepare` at corpus scale (issue 17) and tokenizers beyond GPT-2 (issue 15): the formats people have, the
same bytes whatever the worker count or interruptions, uint32 shards for a large vocabulary (a BPE trained here,
no network), bad input as one line."""
from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import popen_cli, run_cli

from hpcmega.cli import main
from hpcmega.config import load_config
from hpcmega.errors import ConfigError
from hpcmega.data.index import DataError
from hpcmega.data.loader import TokenShardLoader
from hpcmega.data.prepare import prepare
from hpcmega.data.sources import shakespeare_files
from hpcmega.data.tokenizer import load_tokenizer


def _docs(n: int, seed: int = 0) -> list[str]:
    """Documents of 1-40 Shakespeare lines, some with non-ASCII text."""
    lines = [x for x in Path(shakespeare_files()[0]).read_text().splitlines() if x.strip()]
    rng = random.Random(seed)
    docs = []
    for k in range(n):
        start = rng.randrange(len(lines) - 40)
        doc = "\n".join(lines[start: start + rng.randint(1, 40)])
        docs.append(doc + (" — café ☕" if k % 7 == 0 else ""))
    return docs


def _write_jsonl(path: Path, docs: list[str], opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for k, d in enumerate(docs):
            f.write(json.dumps({"id": k, "text": d}) + "\n")
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _cli(args: list) -> object:
    """`hpcmega ARGS` in this process (no interpreter start-up): exit_code, stdout, stderr."""
    return CliRunner().invoke(main, [str(a) for a in args])


def _stream(out: Path) -> list[int]:
    index = json.loads((out / "index.json").read_text())
    parts = [np.fromfile(out / s["file"], dtype=index["dtype"]) for s in index["shards"] + index["val_shards"]]
    return np.concatenate(parts).tolist()


@pytest.fixture(scope="module")
def big_vocab_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE of 70,000 ids (> 65,536: uint32 shards), trained here in ~3 s, saved as a Hugging Face
    model folder would hold it (tokenizer.json + tokenizer_config.json naming its eos token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(90_000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=70_000, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(words[i: i + 50]) for i in range(0, len(words), 50)], trainer)
    folder = tmp_path_factory.mktemp("hf-model")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return folder


def test_tokenizer_api_gpt2_and_a_local_hf_tokenizer(big_vocab_tokenizer):
    gpt2 = load_tokenizer("gpt2")
    assert (gpt2.vocab_size, gpt2.eot_id, gpt2.dtype, gpt2.name) == (50257, 50256, "uint16", "gpt2")
    assert gpt2.encode("Hello world") == [15496, 995] and gpt2.decode([15496, 995]) == "Hello world"
    hf = load_tokenizer(str(big_vocab_tokenizer))  # the folder; the file itself works too
    assert load_tokenizer(str(big_vocab_tokenizer / "tokenizer.json")) is hf
    assert hf.vocab_size == 70_000 and hf.dtype == "uint32" and hf.eot_id == 1  # </s>, from tokenizer_config.json
    text = "héllo wörld, zqx ☕"
    ids = hf.encode(text)
    assert hf.decode(ids) == text and hf.encode("</s>") != [hf.eot_id]  # text never yields the special id
    assert hf.encode_batch([text, "ab"]) == [ids, hf.encode("ab")]
    with pytest.raises(ConfigError, match="no tokenizer.json there"):
        load_tokenizer(str(big_vocab_tokenizer.parent))


def test_uint32_shards_of_a_large_vocabulary_round_trip_through_the_loader(big_vocab_tokenizer, tmp_path):
    docs = _docs(300)
    _write_jsonl(tmp_path / "c.jsonl", docs)
    out = tmp_path / "ds"
    info = prepare(str(tmp_path / "c.jsonl"), str(out), tokenizer=str(big_vocab_tokenizer), shard_tokens=4096,
                   workers=1, val_fraction=0.1)
    tok = load_tokenizer(str(big_vocab_tokenizer))
    index = json.loads((out / "index.json").read_text())
    assert index["dtype"] == "uint32" and index["vocab_size"] == 70_000 and index["eot_id"] == tok.eot_id
    assert index["tokenizer_path"] == str(big_vocab_tokenizer / "tokenizer.json") and index["documents"] == 300
    expected = [i for d in docs for i in tok.encode(d) + [tok.eot_id]]
    assert max(expected) > 65_535 and _stream(out) == expected
    cfg = load_config(overrides={"train.data": str(out), "model.vocab_size": 70_016, "train.seq_len": 32,
                                 "train.global_batch": 4})
    train, val = TokenShardLoader(cfg), TokenShardLoader(cfg, split="val")
    assert train.read(0, train.total_tokens).tolist() + val.read(0, val.total_tokens).tolist() == expected
    assert train.global_batch(0).max() < 70_000 and info["val_tokens"] == val.total_tokens


def test_sample_decodes_with_the_tokenizer_the_data_was_prepared_with(big_vocab_tokenizer, tmp_path):
    from hpcmega.config import ModelConfig
    from hpcmega.data.index import data_tokenizer
    from hpcmega.inference.sample import sample_text
    from hpcmega.models.common import build_model

    _write_jsonl(tmp_path / "c.jsonl", _docs(20))
    prepare(str(tmp_path / "c.jsonl"), str(tmp_path / "ds"), tokenizer=str(big_vocab_tokenizer), workers=1)
    tok = load_tokenizer(str(big_vocab_tokenizer))
    assert data_tokenizer(str(tmp_path / "ds")) is tok and data_tokenizer("synthetic").name == "gpt2"
    model = build_model(ModelConfig(vocab_size=70_016, d_model=32, n_layers=1, n_heads=2, max_seq_len=64), seed=0)
    text = sample_text(model, "zq", 8, 1.0, 0, tok)
    assert text.startswith("zq") and len(text) > 2
    with pytest.raises(ConfigError, match="smaller than the hf-model0 tokenizer's 70000 tokens.*--vocab-size 70016"):
        sample_text(build_model(ModelConfig(vocab_size=50304, d_model=32, n_layers=1, n_heads=2, max_seq_len=64),
                                seed=0), "zq", 8, 1.0, 0, tok)


def test_output_is_byte_identical_for_one_and_two_workers_and_every_format(tmp_path):
    """jsonl, .jsonl.gz, .jsonl.zst and parquet inputs of the same documents give the same token stream; the
    dataset (shards + index) is the same bytes with 1 and 2 worker processes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = _docs(1200, seed=1)
    src = tmp_path / "src"
    src.mkdir()
    _write_jsonl(src / "a.jsonl", docs[:500])
    _write_jsonl(src / "b.jsonl.gz", docs[500:800], gzip.open)
    with open(src / "c.jsonl.zst", "wb") as raw, zstandard.ZstdCompressor().stream_writer(raw) as z:
        z.write("".join(json.dumps({"text": d}) + "\n" for d in docs[800:1000]).encode())
    pq.write_table(pa.table({"text": docs[1000:]}), src / "d.parquet", row_group_size=64)
    (src / "notes.md").write_text("not an input")
    outs = {}
    for workers in (1, 2):
        outs[workers] = tmp_path / f"w{workers}"
        info = prepare(str(src), str(outs[workers]), shard_tokens=10_000, workers=workers, piece_bytes=16_384)
    assert info["pieces"] > 10 and len(info["shards"]) > 3 and info["documents"] == 1200
    assert _files(outs[1]) == _files(outs[2])
    gpt2 = load_tokenizer("gpt2")
    assert _stream(outs[1]) == [i for d in docs for i in gpt2.encode(d) + [gpt2.eot_id]]
    assert [i["name"] for i in info["inputs"]] == ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet"]


def test_a_prepare_killed_mid_way_resumes_to_the_same_bytes(tmp_path):
    _write_jsonl(tmp_path / "c.jsonl", _docs(4000, seed=2))  # ~2 MB: a few seconds of tokenizing
    args = ["data", "prepare", "--source", tmp_path / "c.jsonl", "--workers", "1", "--piece-bytes", "32768",
            "--shard-tokens", "100000"]
    log = tmp_path / "killed.log"
    proc = popen_cli([*args, "--out", tmp_path / "ds"], output=log)
    parts = tmp_path / "ds" / ".prepare" / "parts"
    deadline = time.monotonic() + 120
    while proc.poll() is None and len(list(parts.glob("*.json"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "ds" / "index.json").exists()  # never a readable half dataset
    again = run_cli([*args, "--out", tmp_path / "ds"])
    assert again.returncode == 0, again.stderr
    kept = int(again.stdout.split(" pieces kept")[0].rsplit(", ", 1)[1].split(" of ")[0])
    assert kept >= 3, again.stdout
    prepare(str(tmp_path / "c.jsonl"), str(tmp_path / "clean"), workers=1, piece_bytes=32768, shard_tokens=100_000)
    assert _files(tmp_path / "ds") == _files(tmp_path / "clean")
    assert not (tmp_path / "ds" / ".prepare").exists()


def test_bad_rows_are_skipped_and_counted_or_fail_with_strict(tmp_path):
    lines = [json.dumps({"text": "good one"}), "{not json", json.dumps({"body": "no text field"}),
             json.dumps({"text": 7}), json.dumps({"text": "good two"})]
    src = tmp_path / "c.jsonl"
    src.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "bad \xff utf8"}\n')
    ok = _cli(["data", "prepare", "--source", src, "--out", tmp_path / "ds", "--val-fraction", "0"])
    assert ok.exit_code == 0, ok.stderr
    index = json.loads((tmp_path / "ds" / "index.json").read_text())
    assert index["documents"] == 2
    assert index["bad_rows"] == {"invalid UTF-8": 1, "no text in field 'text'": 2, "not JSON": 1}
    assert "skipped 4 bad row(s)" in ok.stdout.splitlines()[-1]
    strict = _cli(["data", "prepare", "--source", src, "--out", tmp_path / "strict", "--strict"])
    assert strict.exit_code == 2 and "c.jsonl at byte 21: not JSON" in strict.stderr, strict.stderr
    assert "Traceback" not in strict.stderr and not (tmp_path / "strict").exists()
    other = _cli(["data", "prepare", "--source", src, "--out", tmp_path / "f", "--text-field", "body"])
    assert other.exit_code == 0 and json.loads((tmp_path / "f" / "index.json").read_text())["documents"] == 1


@pytest.mark.parametrize("case,words", [
    ("all-bad", ["holds no text"]),
    ("unknown", ["unknown format"]),
    ("tokenizer", ["--tokenizer", "no tokenizer.json there"]),
    ("parquet-column", ["no column 'text'", "--text-field"]),
    ("corrupt-gzip", ["c.jsonl.gz: cannot read it", "BadGzipFile"]),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, case, words):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "in"
    src.mkdir()
    extra = []
    if case == "all-bad":
        (src / "c.jsonl").write_text('{"body": "x"}\n\n')
    elif case == "unknown":
        src = src / "c.csv"
        src.write_text("a,b\n")
    elif case == "tokenizer":
        (src / "c.txt").write_text("text")
        extra = ["--tokenizer", str(tmp_path / "no-such-model")]
    elif case == "corrupt-gzip":
        (src / "c.jsonl.gz").write_bytes(b"this is not gzip data" * 10)
    else:
        pq.write_table(pa.table({"content": ["a", "b"]}), src / "d.parquet")
    result = _cli(["data", "prepare", "--source", src, "--out", tmp_path / "out", *extra])
    assert result.exit_code == 2, result.stdout + result.stderr
    assert all(w in result.stderr for w in words) and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slurm
def test_a_prepare_on_two_slurm_nodes_equals_a_local_one(slurm_cluster, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    docs = _docs(900, seed=3)
    for k in range(3):
        _write_jsonl(src / f"part-{k}.jsonl", docs[k * 300: (k + 1) * 300])
    common = ["data", "prepare", "--source", src, "--piece-bytes", "16384", "--shard-tokens", "20000"]
    submitted = run_cli([*common, "--out", tmp_path / "slurm", "--submit", "--nodes", "2", "--time", "00:10:00",
                         "--wait"], cwd=tmp_path, timeout=600)
    out = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, out
    jobs = [line.split()[1] for line in out.splitlines() if line.startswith("job ") and "finished: COMPLETED" in line]
    assert len(jobs) == 2, out
    nodes = subprocess.run(["sacct", "-j", jobs[0], "-X", "-n", "-P", "-o", "NNodes"], capture_output=True, text=True,
                           check=True).stdout.split()
    assert nodes == ["2"]
    local = run_cli([*common, "--out", tmp_path / "local"])
    assert local.returncode == 0, local.stderr
    slurm_files = _files(tmp_path / "slurm")
    assert slurm_files == _files(tmp_path / "local") and len(slurm_files) > 3  # index + shards, byte for byte
    logs = list((tmp_path / "slurm" / "prepare-job" / "slurm").rglob(f"{jobs[0]}_1_log.err"))
    assert logs and "task 1/2" in logs[0].read_text()  # the second node tokenized its share


def test_the_data_benchmark_runs_and_reports_every_figure(tmp_path, capsys):
    from hpcmega.bench.data import main as bench

    assert bench(["--mb", "1", "--workers", "1", "--dir", str(tmp_path), "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())["corpora"]["1"]
    assert result["tokens"] > 200_000 and 0 < result["ratio"] and 50 < result["peak_rss_mib"] < 1024
    assert "x workers x one core" in capsys.readouterr().out


@pytest.mark.slow
def test_inputs_behind_an_fsspec_url_give_the_same_dataset(tmp_path, s3_endpoint):
    import fsspec

    storage = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": s3_endpoint,
                                                                  "region_name": "us-east-1"}}
    src = tmp_path / "src"
    src.mkdir()
    docs = _docs(400, seed=4)
    _write_jsonl(src / "a.jsonl", docs[:200])
    _write_jsonl(src / "b.jsonl.gz", docs[200:], gzip.open)
    url = f"s3://ckpt/corpus-{tmp_path.name}"
    s3 = fsspec.filesystem("s3", **storage)
    for p in src.iterdir():
        s3.put_file(str(p), f"{url}/{p.name}")
    remote = prepare(url + "/", str(tmp_path / "remote"), storage_options=storage, workers=2, piece_bytes=8192)
    prepare(str(src), str(tmp_path / "local"), workers=1, piece_bytes=8192)
    assert remote["documents"] == 400 and _stream(tmp_path / "remote") == _stream(tmp_path / "local")
