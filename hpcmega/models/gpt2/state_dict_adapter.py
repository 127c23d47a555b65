"""Export to a Hugging Face GPT-2 folder (``config.json``, ``model.safetensors``, tokenizer files) without needing
``transformers``: the folder is what ``GPT2LMHeadModel.from_pretrained`` reads.

How hpcmega's GPT maps onto HF GPT-2 (checked by the round-trip test, logits within 1e-4 in fp32):
- same block: pre-LayerNorm (eps read from the model), biases everywhere but the head, tanh GELU (HF "gelu_new"),
  learned position embeddings, attention scaled by 1/sqrt(head_dim), no dropout (exported as 0.0);
- HF keeps q, k and v in one ``Conv1D`` (weights stored [in, out]): ``c_attn`` is wq|wk|wv concatenated, and
  every Linear weight is transposed;
- hpcmega's head is its own matrix, so the config says ``tie_word_embeddings: false`` and ``lm_head.weight`` is
  written; a padded vocabulary (e.g. 50304) is kept as is (HF accepts any size; the extra logits are never produced
  by the tokenizer).
A parameter with no GPT-2 counterpart, or one missing, is refused by name rather than silently dropped.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from hpcmega.errors import ConfigError
from hpcmega.data.tokenizer import EOT_ID, EOT_TOKEN, GPT2_VOCAB_SIZE, tokenizer_files
from hpcmega.models.gpt2.model import GPT

WEIGHTS_FILE = "model.safetensors"


def _block_tensors(i: int, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p, h = f"blocks.{i}.", f"transformer.h.{i}."
    qkv = [sd.pop(p + f"attn.{w}.weight") for w in ("wq", "wk", "wv")]
    qkv_bias = [sd.pop(p + f"attn.{w}.bias") for w in ("wq", "wk", "wv")]
    out = {
        h + "attn.c_attn.weight": torch.cat(qkv, dim=0).t(),
        h + "attn.c_attn.bias": torch.cat(qkv_bias),
    }
    for ours, theirs, transpose in (
        ("ln1.weight", "ln_1.weight", False), ("ln1.bias", "ln_1.bias", False),
        ("ln2.weight", "ln_2.weight", False), ("ln2.bias", "ln_2.bias", False),
        ("attn.wo.weight", "attn.c_proj.weight", True), ("attn.wo.bias", "attn.c_proj.bias", False),
        ("mlp.fc1.weight", "mlp.c_fc.weight", True), ("mlp.fc1.bias", "mlp.c_fc.bias", False),
        ("mlp.fc2.weight", "mlp.c_proj.weight", True), ("mlp.fc2.bias", "mlp.c_proj.bias", False),
    ):
        t = sd.pop(p + ours)
        out[h + theirs] = t.t() if transpose else t
    return out


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """HF GPT2LMHeadModel tensor names -> contiguous fp32 CPU tensors of the full model."""
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    try:
        out = {
            "transformer.wte.weight": sd.pop("tok_emb.weight"),
            "transformer.wpe.weight": sd.pop("pos_emb.weight"),
            "transformer.ln_f.weight": sd.pop("ln_f.weight"),
            "transformer.ln_f.bias": sd.pop("ln_f.bias"),
            "lm_head.weight": sd.pop("head.weight"),
        }
        for i in range(model.cfg.n_layers):
            out.update(_block_tensors(i, sd))
    except KeyError as e:
        raise ConfigError(f"cannot export to GPT-2: the model has no {e.args[0]!r} (a pipeline stage, not the full "
                          "model?)") from None
    if sd:
        raise ConfigError(f"cannot export to GPT-2: {', '.join(sorted(sd))}: no GPT-2 counterpart")
    return {k: v.contiguous().clone() for k, v in out.items()}


def hf_config(model: GPT) -> dict:
    m = model.cfg
    eps = {block.ln1.eps for block in model.blocks.values()} | {block.ln2.eps for block in model.blocks.values()}
    eps.add(model.ln_f.eps)
    if len(eps) != 1:
        raise ConfigError(f"cannot export to GPT-2: its LayerNorms share one epsilon, this model uses {sorted(eps)}")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": m.vocab_size,
        "n_positions": m.max_seq_len,
        "n_embd": m.d_model,
        "n_layer": m.n_layers,
        "n_head": m.n_heads,
        "n_inner": 4 * m.d_model,
        "activation_function": "gelu_new",  # = F.gelu(approximate="tanh") in hpcmega.models.gpt2.model.MLP
        "layer_norm_epsilon": eps.pop(),
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": False,
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "torch_dtype": "float32",
    }


def write_tokenizer(out: Path, max_len: int) -> None:
    """GPT-2's own vocab.json/merges.txt (the files hpcmega's tokenizer is built from) and their settings."""
    for name, src in tokenizer_files().items():
        shutil.copyfile(src, out / name)
    special = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    settings = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_len, "add_prefix_space": False,
                "add_bos_token": False, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=1))


def export_hf(model: GPT, out: str | Path) -> list[str]:
    """Write the HF folder; returns notes for the user (e.g. why no tokenizer was written)."""
    from safetensors.torch import save_file

    tensors, config = hf_state_dict(model), hf_config(model)  # refuse before writing anything
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    if model.cfg.vocab_size < GPT2_VOCAB_SIZE:
        return [f"no tokenizer files: the model's vocabulary ({model.cfg.vocab_size}) is smaller than GPT-2's "
                f"{GPT2_VOCAB_SIZE} tokens (trained on synthetic tokens, not `hpcmega data prepare` shards)"]
    write_tokenizer(out, model.cfg.max_seq_len)
    return []
