"""Hugging Face ``GPT2LMHeadModel`` <-> hpcmega's GPT: the names, shapes and settings of each; the folders are read
and written by hpcmega.models.hf (which needs ``safetensors`` only, not ``transformers``).

How hpcmega's GPT maps onto HF GPT-2 (checked by the round-trip test, logits within 1e-4 in fp32):
- same block: pre-LayerNorm (eps read from the model), biases everywhere but the head, tanh GELU (HF "gelu_new"),
  learned position embeddings, attention scaled by 1/sqrt(head_dim), no dropout (exported as 0.0);
- HF keeps q, k and v in one ``Conv1D`` (weights stored [in, out]): ``c_attn`` is wq|wk|wv concatenated, and
  every Linear weight is transposed;
- hpcmega's head is its own matrix, so the config says ``tie_word_embeddings: false`` and ``lm_head.weight`` is
  written; a padded vocabulary (e.g. 50304) is kept as is (HF accepts any size; the extra logits are never produced
  by the tokenizer).
A parameter with no GPT-2 counterpart, or one missing, is refused by name rather than silently dropped; so is, on
import, a config.json setting the block cannot express.
"""
from __future__ import annotations

from typing import Callable

import torch

from hpcmega.config import ModelConfig
from hpcmega.errors import ConfigError
from hpcmega.data.tokenizer import EOT_ID
from hpcmega.models.gpt2.model import GPT

def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _transposed(t: torch.Tensor) -> torch.Tensor:
    return t.t()


# hpcmega name -> HF name within a block, and the conversion (its own inverse: export and import use it alike).
_PAIRS = (
    ("ln1.weight", "ln_1.weight", _same), ("ln1.bias", "ln_1.bias", _same),
    ("ln2.weight", "ln_2.weight", _same), ("ln2.bias", "ln_2.bias", _same),
    ("attn.wo.weight", "attn.c_proj.weight", _transposed), ("attn.wo.bias", "attn.c_proj.bias", _same),
    ("mlp.fc1.weight", "mlp.c_fc.weight", _transposed), ("mlp.fc1.bias", "mlp.c_fc.bias", _same),
    ("mlp.fc2.weight", "mlp.c_proj.weight", _transposed), ("mlp.fc2.bias", "mlp.c_proj.bias", _same),
)


def _block_tensors(i: int, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p, h = f"blocks.{i}.", f"transformer.h.{i}."
    qkv = [sd.pop(p + f"attn.{w}.weight") for w in ("wq", "wk", "wv")]
    qkv_bias = [sd.pop(p + f"attn.{w}.bias") for w in ("wq", "wk", "wv")]
    out = {
        h + "attn.c_attn.weight": torch.cat(qkv, dim=0).t(),
        h + "attn.c_attn.bias": torch.cat(qkv_bias),
    }
    for ours, theirs, convert in _PAIRS:
        out[h + theirs] = convert(sd.pop(p + ours))
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


# -- import: a GPT2LMHeadModel folder -> hpcmega's parameters -----------------------------------------------------
HF_ARCHITECTURES = ("GPT2LMHeadModel",)


def ignored_hf_tensor(m: ModelConfig, name: str) -> bool:
    """Causal-mask buffers older GPT-2 checkpoints saved beside the weights (``h.0.attn.bias``/``masked_bias``)."""
    parts = name.removeprefix("transformer.").split(".")
    return len(parts) == 4 and parts[0] == "h" and parts[2] == "attn" and parts[3] in ("bias", "masked_bias")


def model_section(hf: dict) -> dict:
    """hpcmega's model fields from a GPT-2 config.json; a setting the block cannot express is refused by name."""
    try:
        d, heads, layers = int(hf["n_embd"]), int(hf["n_head"]), int(hf["n_layer"])
        section = {"family": "gpt2", "vocab_size": int(hf["vocab_size"]), "d_model": d, "n_layers": layers,
                   "n_heads": heads, "max_seq_len": int(hf["n_positions"]),
                   "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5))}
    except KeyError as e:
        raise ConfigError(f"config.json of a GPT2LMHeadModel lacks {e.args[0]!r}; re-save it with transformers") \
            from None
    unsupported = {
        "n_inner": (hf.get("n_inner") not in (None, 4 * d), "4 x n_embd (hpcmega's MLP)"),
        "activation_function": (hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"),
                                "gelu_new (tanh GELU)"),
        "scale_attn_weights": (hf.get("scale_attn_weights", True) is not True, "true"),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False) is not False, "false"),
        "add_cross_attention": (hf.get("add_cross_attention", False) is not False, "false"),
    }
    bad = [f"{key}={hf.get(key)!r} (hpcmega builds {want})" for key, (wrong, want) in unsupported.items() if wrong]
    if bad:
        raise ConfigError(f"cannot import this GPT-2: {'; '.join(bad)}")
    return section


def _third(k: int, d: int, weight: bool):
    """q (k=0), k (1) or v (2) out of HF's fused c_attn ([in, 3d] weight stored transposed, [3d] bias)."""
    def take(t: torch.Tensor) -> torch.Tensor:
        return t[:, k * d:(k + 1) * d].t() if weight else t[k * d:(k + 1) * d]
    return take


def import_plan(m: ModelConfig, names: set[str]) -> dict[str, tuple[tuple[str, ...], Callable]]:
    """hpcmega parameter -> (HF tensors read, function making it). GPT2LMHeadModel prefixes ``transformer.``
    (GPT2Model does not); a tied head (no ``lm_head.weight``) is a copy of the token embeddings."""
    h = "transformer." if "transformer.wte.weight" in names else ""
    head = "lm_head.weight" if "lm_head.weight" in names else f"{h}wte.weight"
    plan = {"tok_emb.weight": ((f"{h}wte.weight",), _same), "pos_emb.weight": ((f"{h}wpe.weight",), _same),
            "ln_f.weight": ((f"{h}ln_f.weight",), _same), "ln_f.bias": ((f"{h}ln_f.bias",), _same),
            "head.weight": ((head,), _same)}
    for i in range(m.n_layers):
        p, q = f"blocks.{i}.", f"{h}h.{i}."
        for k, w in enumerate(("wq", "wk", "wv")):
            plan[f"{p}attn.{w}.weight"] = ((f"{q}attn.c_attn.weight",), _third(k, m.d_model, weight=True))
            plan[f"{p}attn.{w}.bias"] = ((f"{q}attn.c_attn.bias",), _third(k, m.d_model, weight=False))
        for ours, theirs, convert in _PAIRS:
            plan[p + ours] = ((q + theirs,), convert)
    return plan

