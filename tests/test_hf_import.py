"""`hpcmega ckpt import --from hf`: bad folders are refused with one line before anything is written, and the import
streams -- its peak memory grows by the tensor being written and the file tensor it is made from, not by the model
(300+ MB models, GPT-2 in fp32 and Llama in bf16, measured in a subprocess).
The round trips through transformers, in one process and resumed at tp=2 and pp=2, are in tests/test_hf_roundtrip.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from hpcmega.cli import main

# A GPT-2 of n_embd 1024, 6 layers: 307 MB in fp32; its largest tensors (mlp.c_fc / c_proj) are 16.8 MB each.
BIG = dict(vocab=1024, d=1024, layers=6, positions=64)


def gpt2_tensors(vocab: int, d: int, layers: int, positions: int) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's tensors at these sizes (zeros: the values do not matter for names, shapes or memory)."""
    t = {"transformer.wte.weight": torch.zeros(vocab, d), "transformer.wpe.weight": torch.zeros(positions, d),
         "transformer.ln_f.weight": torch.zeros(d), "transformer.ln_f.bias": torch.zeros(d)}
    for i in range(layers):
        h = f"transformer.h.{i}."
        shapes = {"ln_1.weight": (d,), "ln_1.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
                  "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,), "attn.c_proj.weight": (d, d),
                  "attn.c_proj.bias": (d,), "mlp.c_fc.weight": (d, 4 * d), "mlp.c_fc.bias": (4 * d,),
                  "mlp.c_proj.weight": (4 * d, d), "mlp.c_proj.bias": (d,)}
        t.update({h + name: torch.zeros(shape) for name, shape in shapes.items()})
    return t


def write_gpt2_folder(folder: Path, vocab: int, d: int, layers: int, positions: int, shards: int = 1,
                      config: dict | None = None) -> dict[str, torch.Tensor]:
    """A save_pretrained-style folder: config.json and the weights, in ``shards`` files with an index if > 1."""
    folder.mkdir(parents=True)
    tensors = gpt2_tensors(vocab, d, layers, positions)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for k in range(shards):
            file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = names[k::shards]
            save_file({n: tensors[n] for n in part}, str(folder / file))
            weight_map.update({n: file for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab, "n_embd": d,
          "n_layer": layers, "n_head": 4, "n_positions": positions, **(config or {})}
    (folder / "config.json").write_text(json.dumps(hf))
    return tensors


def refused(folder: Path, out: Path, *words: str) -> None:
    result = CliRunner().invoke(main, ["ckpt", "import", "--from", "hf", str(folder), "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    for word in words:
        assert word in lines[0], (word, result.output)


def test_bad_folders_are_refused_in_one_line_and_nothing_is_written(tmp_path):
    small = dict(vocab=64, d=16, layers=2, positions=8)
    good = tmp_path / "good"
    write_gpt2_folder(good, **small)
    out = tmp_path / "out"

    (tmp_path / "no-config").mkdir()
    refused(tmp_path / "no-config", out, "has no config.json")

    write_gpt2_folder(tmp_path / "bert", **small, config={"architectures": ["BertForMaskedLM"]})
    refused(tmp_path / "bert", out, "BertForMaskedLM is not supported", "GPT2LMHeadModel", "LlamaForCausalLM")

    missing = tmp_path / "missing"
    tensors = write_gpt2_folder(missing, **small)
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, str(missing / "model.safetensors"))
    refused(missing, out, "lacks tensor(s) transformer.h.1.mlp.c_fc.weight")

    write_gpt2_folder(tmp_path / "wider", **small, config={"n_embd": 32})  # config.json and weights disagree
    refused(tmp_path / "wider", out, "shape mismatch", "transformer.wte.weight [64, 16]", "[64, 32]")

    write_gpt2_folder(tmp_path / "exact-gelu", **small, config={"activation_function": "gelu"})
    refused(tmp_path / "exact-gelu", out, "activation_function='gelu'")

    sharded = tmp_path / "sharded"
    write_gpt2_folder(sharded, **small, shards=3)
    (sharded / "model-00002-of-00003.safetensors").unlink()
    refused(sharded, out, "model-00002-of-00003.safetensors", "download every shard")
    assert not out.exists()

    out.mkdir()
    (out / "step-00000007").mkdir()
    refused(good, out, f"--out {out} already exists")
    assert [p.name for p in out.iterdir()] == ["step-00000007"]


MEASURE = """
import json, sys
from hpcmega.models.hf import Import

def status(key):  # this process's resident memory (VmRSS) and its peak (VmHWM), in bytes
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

job = Import(sys.argv[1], sys.argv[2])  # everything checked; nothing read yet but the headers
before = status("VmRSS")
job.write()
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""
# VmHWM, not getrusage's ru_maxrss: a child's ru_maxrss starts at its parent's peak (Linux keeps the larger of the
# old and new address space's across exec), and the pytest process has just built the 307 MB of tensors.


def write_llama_folder(folder: Path, vocab: int, d: int, ffn: int, layers: int) -> dict[str, torch.Tensor]:
    """A LlamaForCausalLM folder in bf16 (zeros), one file: no biases, so gate/up/down (the largest tensors) are
    written one right after another."""
    folder.mkdir(parents=True)
    kv = d // 4
    t = {"model.embed_tokens.weight": torch.zeros(vocab, d), "model.norm.weight": torch.zeros(d),
         "lm_head.weight": torch.zeros(vocab, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
                  "self_attn.q_proj.weight": (d, d), "self_attn.k_proj.weight": (kv, d),
                  "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, d),
                  "mlp.gate_proj.weight": (ffn, d), "mlp.up_proj.weight": (ffn, d), "mlp.down_proj.weight": (d, ffn)}
        t.update({p + name: torch.zeros(shape) for name, shape in shapes.items()})
    t = {name: x.to(torch.bfloat16) for name, x in t.items()}
    save_file(t, str(folder / "model.safetensors"))
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": d,
          "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 2,
          "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(hf))
    return t


def two_tensor_bound(tensors: dict[str, torch.Tensor], job) -> int:
    """The most memory two tensors take at once: a tensor being made (fp32) plus the file tensor(s) it is made
    from -- the issue's "one tensor beyond the one being written"."""
    return max(job.params[name].numel() * 4 + sum(tensors[n].numel() * tensors[n].element_size() for n in names)
               for name, (names, _) in job.plan.items())


# DCP's own working memory during the save (metadata, pickles, the writer's buffers), measured 5.7 MB.
DCP_BYTES = 8e6


@pytest.mark.parametrize("family", ["gpt2-fp32-sharded", "llama-bf16"])
def test_the_import_holds_at_most_the_tensor_being_written_and_its_source(tmp_path, family):
    """Peak resident memory of the import grows by the tensor being written plus the file tensor it is made from,
    not by the model (300+ MB; the largest tensors are 16.8 MB in fp32). glibc's allocator is told to give every
    freed block back at once (MALLOC_MMAP_THRESHOLD_), so the peak shows what the import holds, not what malloc
    keeps cached. In the Llama folder gate, up and down follow each other: without releasing the tensor DCP wrote
    last, up's file tensor and fp32 copy would sit beside gate's (42 MB > the bound's 33 MB)."""
    from hpcmega.models.hf import Import

    if family == "llama-bf16":
        tensors = write_llama_folder(tmp_path / "hf", vocab=1024, d=1024, ffn=4096, layers=6)
    else:
        tensors = write_gpt2_folder(tmp_path / "hf", **BIG, shards=2)
    model_bytes = sum(t.numel() * 4 for t in tensors.values())
    bound = two_tensor_bound(tensors, Import(tmp_path / "hf", str(tmp_path / "unused")))
    del tensors
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "hf"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rss = json.loads(done.stdout.splitlines()[-1])
    growth = rss["peak"] - rss["before"]
    assert model_bytes > 300e6 and bound < model_bytes / 8
    assert growth <= bound + DCP_BYTES, (growth / 1e6, bound / 1e6)
    written = sum(f.stat().st_size for f in (tmp_path / "out" / "step-00000000").glob("__*"))
    assert written >= model_bytes  # every tensor is on storage (fp32)


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        rope_theta=1e6, rms_norm_eps=1e-5))


def mistral_tied():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=32,
                                            sliding_window=None, tie_word_embeddings=True))


# Llama 3.1's RoPE scaling, with a short "original" context so that the 8 frequency pairs of a 16-wide head fall in
# all three bands (kept, interpolated, divided by the factor).
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def llama31(rope: dict | None = LLAMA3_ROPE):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                                        rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0}))


@pytest.mark.parametrize("make", [qwen2, mistral_tied, llama31])
def test_llama_style_variants_import_and_export_with_transformers_logits(tmp_path, make):
    """Qwen2 (q/k/v biases), a Mistral with tied embeddings and a Llama with Llama 3.1's RoPE scaling, in one
    process: the import gives transformers' logits, and the export loads back in transformers with them (the tp/pp
    round trip of the Llama family is in tests/test_hf_roundtrip.py)."""
    from transformers import AutoModelForCausalLM

    from hpcmega.checkpoint.locate import find_checkpoint
    from hpcmega.inference.load import load_model
    from hpcmega.models.hf import Import, export_hf

    torch.manual_seed(0)
    hf = make().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "hf")
    ids = torch.randint(128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    Import(tmp_path / "hf", str(tmp_path / "imported")).write()
    model, cfg = load_model(find_checkpoint(str(tmp_path / "imported"), trust=True))
    assert (cfg.model.qkv_bias, cfg.model.tie_embeddings) == \
        {qwen2: (True, False), mistral_tied: (False, True), llama31: (False, False)}[make]
    if make is llama31:
        assert cfg.model.rope_scaling == 8.0 and cfg.model.rope_original_max_seq_len == 16
        unscaled = llama31(rope=None).eval()
        unscaled.load_state_dict(hf.state_dict())
        with torch.no_grad():  # the scaling changes the logits: the equality below is a check of it
            assert (unscaled(ids).logits - expected).abs().max() > 1e-2
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected, atol=1e-4, rtol=0)
    export_hf(model, tmp_path / "exported")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32).eval()
    assert type(back).__name__ == ("Qwen2ForCausalLM" if make is qwen2 else "LlamaForCausalLM")
    assert back.config.rope_parameters["rope_type"] == ("llama3" if make is llama31 else "default")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, expected, atol=1e-4, rtol=0)


def test_rope_scaling_rules_other_than_llama3_are_refused(tmp_path):
    llama31().save_pretrained(tmp_path / "yarn")
    config = json.loads((tmp_path / "yarn" / "config.json").read_text())
    config["rope_parameters"] = {**LLAMA3_ROPE, "rope_type": "yarn"}
    (tmp_path / "yarn" / "config.json").write_text(json.dumps(config))
    refused(tmp_path / "yarn", tmp_path / "out", "rope_type 'yarn'", "'llama3'")
    assert not (tmp_path / "out").exists()
