"""`hpcmega sample`: a checkpoint written with tensor parallelism, loaded on one process, prints text that continues
what the model learned; the same seed prints the same text, temperature 0 ignores the seed."""
from __future__ import annotations

import shutil

import pytest
from conftest import run_cli

from hpcmega.errors import ConfigError
from hpcmega.config import ModelConfig
from hpcmega.inference.sample import sample_text
from hpcmega.models.common import build_model

LINE = "one two three four five six seven eight nine ten "


def test_a_model_without_gpt2s_vocabulary_is_refused():
    model = build_model(ModelConfig(vocab_size=256, d_model=64, n_layers=1, n_heads=4, max_seq_len=32), seed=0)
    with pytest.raises(ConfigError, match="--vocab-size 50304"):
        sample_text(model, "hello", 5, 0.0, 0)


def test_only_a_run_folders_own_checkpoints_load_without_trust(tmp_path):
    """`sample` / `ckpt export` pick checkpoints with find_checkpoint: the --resume rule (DCP .metadata is a pickle)
    applies -- a run folder, its checkpoints folder or one of its step folders load; a copy elsewhere needs
    --trust-checkpoint."""
    from hpcmega.config import Config
    from hpcmega.checkpoint.locate import find_checkpoint
    from hpcmega.runs.files import RunFolder

    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    run.write_config(Config().to_toml())
    step = run / "checkpoints" / "step-00000002"
    step.mkdir(parents=True)
    (step / "meta.json").write_text('{"step": 2, "manifest": {}}')
    for target in (run.path, run / "checkpoints", step):
        assert find_checkpoint(str(target)).step == 2
    copy = shutil.copytree(run / "checkpoints", tmp_path / "copy")
    for target in (copy, copy / step.name):
        with pytest.raises(ConfigError, match=r"not inside a run folder's checkpoint location.*--trust-checkpoint"):
            find_checkpoint(str(target))
        assert find_checkpoint(str(target), trust=True).step == 2


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

    def sample(*args, target=run_dir):
        result = run_cli(["sample", target, "--max-new-tokens", "12", *args])
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout.rstrip("\n")

    greedy = sample("--prompt", "one two three", "--temperature", "0")
    assert greedy.startswith(LINE.strip()), greedy  # it learned the line (training loss ~0.3)
    # A copy outside any run folder is loaded only with --trust-checkpoint: its DCP .metadata is a pickle.
    step40 = run_dir / "checkpoints" / "step-00000040"
    copy = shutil.copytree(step40, tmp_path / "elsewhere" / step40.name)
    refused = run_cli(["sample", copy, "--prompt", "one two three"])
    assert refused.returncode == 2 and "--trust-checkpoint" in refused.stderr, refused.stdout + refused.stderr
    assert "unpickles" in refused.stderr and refused.stdout == ""
    trusted = sample("--prompt", "one two three", "--temperature", "0", "--seed", "7", "--trust-checkpoint",
                     target=copy)
    assert trusted == greedy  # the same weights, and temperature 0 ignores the seed
    warm = sample("--prompt", "six", "--temperature", "1.0", "--seed", "3")
    assert warm.startswith("six ") and len(warm) > len("six ")
    assert sample("--prompt", "six", "--temperature", "1.0", "--seed", "3", "--step", "40") == warm

    wrong = run_cli(["sample", run_dir, "--step", "5"])
    assert wrong.returncode == 2 and "complete step(s): 40" in wrong.stderr
