"""`hpcmega sample`: a checkpoint written with tensor parallelism, loaded on one process, prints text that continues
what the model learned; the same seed prints the same text, temperature 0 ignores the seed."""
from __future__ import annotations

import pytest
from conftest import run_cli

from hpcmega.config import ConfigError, ModelConfig
from hpcmega.inference.sample import sample_text
from hpcmega.model.gpt import build_model

LINE = "one two three four five six seven eight nine ten "


def test_a_model_without_gpt2s_vocabulary_is_refused():
    model = build_model(ModelConfig(vocab_size=256, d_model=64, n_layers=1, n_heads=4, max_seq_len=32), seed=0)
    with pytest.raises(ConfigError, match="--vocab-size 50304"):
        sample_text(model, "hello", 5, 0.0, 0)


@pytest.mark.slow
def test_sample_prints_what_a_tp2_run_learned_and_is_deterministic(tmp_path):
    (tmp_path / "text.txt").write_text(LINE * 300)
    data = tmp_path / "data"
    assert run_cli(["data", "prepare", "--source", tmp_path / "text.txt", "--out", data]).returncode == 0
    run_dir = tmp_path / "run"
    trained = run_cli(["run", "--nproc", "2", "--tp", "2", "--data", data, "--vocab-size", "50304", "--layers", "1",
                       "--steps", "40", "--global-batch", "8", "--micro-batch", "8", "--seq-len", "32", "--lr", "3e-2",
                       "--min-lr", "3e-2", "--wandb", "disabled", "--run-dir", run_dir], cwd=tmp_path)
    assert trained.returncode == 0, trained.stdout + trained.stderr

    def sample(*args):
        result = run_cli(["sample", run_dir, "--max-new-tokens", "12", *args])
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout.rstrip("\n")

    greedy = sample("--prompt", "one two three", "--temperature", "0")
    assert greedy.startswith(LINE.strip()), greedy  # it learned the line (training loss ~0.3)
    assert sample("--prompt", "one two three", "--temperature", "0", "--seed", "7") == greedy
    warm = sample("--prompt", "six", "--temperature", "1.0", "--seed", "3")
    assert warm.startswith("six ") and len(warm) > len("six ")
    assert sample("--prompt", "six", "--temperature", "1.0", "--seed", "3", "--step", "40") == warm

    wrong = run_cli(["sample", run_dir, "--step", "5"])
    assert wrong.returncode == 2 and "complete step(s): 40" in wrong.stderr
