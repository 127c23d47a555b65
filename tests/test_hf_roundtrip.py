"""Hugging Face models in and out: a random-initialised transformers model, saved with save_pretrained, imported
with `hpcmega ckpt import --from hf`, gives transformers' logits (fp32, within 1e-4) in one process and when the
imported checkpoint is resumed at tp=2 and at pp=2 (real gloo ranks, one process group for every family and
layout); exported back with `hpcmega ckpt export --to hf`, transformers loads it with the same logits.
"""
from __future__ import annotations

import pytest
import torch
from conftest import run_cli
from engine_harness import resumed_logits, spawn

from hpcmega.checkpoint.locate import find_checkpoint
from hpcmega.config import Config
from hpcmega.inference.load import load_model

pytestmark = pytest.mark.slow

LOGITS_ATOL = 1e-4  # fp32, as tests/test_export.py
SEQ = 24


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=4, n_head=4))


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64))


FAMILIES = {"gpt2": gpt2, "llama": llama}
LAYOUTS = {"tp2": {"tp": 2}, "pp2": {"pp": 2}}


def saved_hf_model(make, folder) -> torch.Tensor:
    """Build, move every weight off its init value (norms are 1 and biases 0 at init: every mapping must matter),
    save_pretrained (safetensors) into ``folder``; returns the model's logits of ids()."""
    torch.manual_seed(0)
    model = make().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    with torch.no_grad():
        return model(ids()).logits


def ids() -> torch.Tensor:
    return torch.randint(256, (2, SEQ), generator=torch.Generator().manual_seed(1))


def hf_logits(folder) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids()).logits


def layout_config(imported: str, tp: int = 1, pp: int = 1) -> Config:
    """The imported model's config (what `--init-from`/`--resume` read) at this layout, resuming the import."""
    cfg = Config.from_dict(find_checkpoint(imported, trust=True).meta["config"])
    cfg.parallel.tp, cfg.parallel.pp = tp, pp
    cfg.train.seq_len, cfg.train.global_batch, cfg.train.micro_batch = SEQ, 2, 1
    cfg.checkpoint.resume, cfg.checkpoint.trust = f"{imported}/step-00000000", True
    return cfg


def every_layout(jobs: list[tuple[str, Config, str]]) -> dict[str, torch.Tensor | None]:
    """Executed on every rank: the logits of each (name, config, run folder), one after the other."""
    return {name: resumed_logits(cfg, run_dir, ids()) for name, cfg, run_dir in jobs}


def test_hf_models_import_resume_at_any_layout_and_export_with_transformers_logits(tmp_path):
    expected, jobs = {}, []
    for family, make in FAMILIES.items():
        folder, imported = tmp_path / f"hf-{family}", str(tmp_path / f"imported-{family}")
        expected[family] = saved_hf_model(make, folder)
        done = run_cli(["ckpt", "import", "--from", "hf", folder, "--out", imported])
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"-> {imported}/step-00000000" in done.stdout

        model, _ = load_model(find_checkpoint(imported, trust=True))  # one process
        with torch.no_grad():
            torch.testing.assert_close(model(ids()), expected[family], atol=LOGITS_ATOL, rtol=0)

        exported = tmp_path / f"exported-{family}"
        done = run_cli(["ckpt", "export", imported, "--to", "hf", exported, "--trust-checkpoint"])
        assert done.returncode == 0, done.stdout + done.stderr
        torch.testing.assert_close(hf_logits(exported), expected[family], atol=LOGITS_ATOL, rtol=0)

        jobs += [(f"{family}-{name}", layout_config(imported, **layout), str(tmp_path / f"run-{family}-{name}"))
                 for name, layout in LAYOUTS.items()]

    ranks = spawn(2, every_layout, jobs)
    for name, _, _ in jobs:
        got = [r[name] for r in ranks if r[name] is not None]
        assert got, f"{name}: no rank holds the logits"
        for logits in got:
            torch.testing.assert_close(logits, expected[name.split("-")[0]], atol=LOGITS_ATOL, rtol=0, msg=name)
