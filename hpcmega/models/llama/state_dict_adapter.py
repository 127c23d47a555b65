"""Hugging Face ``LlamaForCausalLM``-style checkpoints (Llama 2/3, Mistral, Qwen2) <-> hpcmega's Llama parameters.

The mapping is a rename (table in hpcmega.models.llama.model): hpcmega's RoPE rotates the two halves of each head
(``rotate_half``), the convention HF checkpoints are stored in, so q/k are not permuted (Meta's original
checkpoints rotate interleaved pairs; HF's conversion script permuted them once, torchtitan permutes on each
import). The round-trip test pins this: HF's logits equal hpcmega's within 1e-4 in fp32.

RoPE scaling by Llama 3.1's long-context rule (``rope_type`` "llama3", as Llama 3.1-3.3 ship) maps onto the
``rope_scaling`` fields. What the block cannot express is refused by name rather than approximated: other RoPE
scaling rules (YaRN, dynamic NTK, linear, ...), sliding-window attention shorter than the context, biases outside
q/k/v (Llama's ``attention_bias`` also biases o_proj; Qwen2 biases q/k/v only, which is ``qkv_bias``), MLP biases,
a head_dim other than hidden_size / num_attention_heads, an activation other than SiLU.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from hpcmega.config import ModelConfig
from hpcmega.errors import ConfigError

HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# hpcmega name within block i -> HF name within model.layers.i
_BLOCK = (
    ("ln1.weight", "input_layernorm.weight"),
    ("attn.wq.weight", "self_attn.q_proj.weight"),
    ("attn.wk.weight", "self_attn.k_proj.weight"),
    ("attn.wv.weight", "self_attn.v_proj.weight"),
    ("attn.wo.weight", "self_attn.o_proj.weight"),
    ("ln2.weight", "post_attention_layernorm.weight"),
    ("mlp.gate.weight", "mlp.gate_proj.weight"),
    ("mlp.up.weight", "mlp.up_proj.weight"),
    ("mlp.down.weight", "mlp.down_proj.weight"),
)
_QKV_BIAS = (("attn.wq.bias", "self_attn.q_proj.bias"), ("attn.wk.bias", "self_attn.k_proj.bias"),
             ("attn.wv.bias", "self_attn.v_proj.bias"))
_TOP = (("tok_emb.weight", "model.embed_tokens.weight"), ("ln_f.weight", "model.norm.weight"))
_HEAD = ("head.weight", "lm_head.weight")


def names(m: ModelConfig) -> dict[str, str]:
    """hpcmega parameter name -> HF tensor name, for the model ``m`` describes."""
    pairs = dict(_TOP)
    if not m.tie_embeddings:
        pairs[_HEAD[0]] = _HEAD[1]
    for i in range(m.n_layers):
        for ours, theirs in _BLOCK + (_QKV_BIAS if m.qkv_bias else ()):
            pairs[f"blocks.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return pairs


# -- import ---------------------------------------------------------------------------------------------------------
# Llama 3.1's RoPE scaling: hpcmega's field <- HF's key in rope_parameters / rope_scaling
_LLAMA3_ROPE = (("rope_scaling", "factor"), ("rope_low_freq_factor", "low_freq_factor"),
                ("rope_high_freq_factor", "high_freq_factor"),
                ("rope_original_max_seq_len", "original_max_position_embeddings"))


def _rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """RoPE's settings from either config.json style: transformers >= 5 ``rope_parameters``, older top-level
    ``rope_theta`` + ``rope_scaling``; ``rope_type`` "default" when there is no scaling."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params["rope_type"] = str(params.get("rope_type") or params.get("type") or "default")
    return params


def _rope_fields(hf: dict[str, Any]) -> dict[str, Any]:
    params = _rope_parameters(hf)
    fields: dict[str, Any] = {"rope_theta": float(params["rope_theta"]), "rope_scaling": 0.0}
    if params["rope_type"] == "llama3":
        for (ours, theirs), kind in zip(_LLAMA3_ROPE, (float, float, float, int)):
            fields[ours] = kind(params[theirs])
    return fields


def _refusals(hf: dict[str, Any], arch: str, d: int, heads: int, context: int) -> list[str]:
    kind = _rope_parameters(hf)["rope_type"]
    window = hf.get("sliding_window") if hf.get("use_sliding_window", arch != "Qwen2ForCausalLM") else None
    checks = {
        "rope scaling": (kind not in ("default", "llama3"),
                         f"rope_type {kind!r} (hpcmega's RoPE scales by Llama 3.1's rule, 'llama3', only)"),
        "sliding_window": (window is not None and int(window) < context,
                           f"{window} < max_position_embeddings {context} (hpcmega attends to the whole context)"),
        "attention_bias": (bool(hf.get("attention_bias")), "true (biases on o_proj too; hpcmega biases q/k/v only)"),
        "mlp_bias": (bool(hf.get("mlp_bias")), "true (hpcmega's SwiGLU has no biases)"),
        "hidden_act": (hf.get("hidden_act", "silu") != "silu", f"{hf.get('hidden_act')!r} (hpcmega uses SiLU)"),
        "head_dim": (hf.get("head_dim") not in (None, d // heads),
                     f"{hf.get('head_dim')} != hidden_size / num_attention_heads = {d // heads}"),
    }
    return [f"{key} {why}" for key, (wrong, why) in checks.items() if wrong]


def model_section(hf: dict[str, Any]) -> dict[str, Any]:
    """hpcmega's model fields from a LlamaForCausalLM-style config.json."""
    arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
    try:
        d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        section = {"family": "llama", "vocab_size": int(hf["vocab_size"]), "d_model": d,
                   "n_layers": int(hf["num_hidden_layers"]), "n_heads": heads,
                   "n_kv_heads": int(hf.get("num_key_value_heads") or heads),
                   "ffn_hidden": int(hf["intermediate_size"]),
                   "max_seq_len": int(hf["max_position_embeddings"]), **_rope_fields(hf),
                   "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
                   "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
                   "qkv_bias": arch == "Qwen2ForCausalLM"}
    except KeyError as e:
        raise ConfigError(f"config.json of a {arch} lacks {e.args[0]!r}; re-save it with transformers") from None
    bad = _refusals(hf, arch, d, heads, section["max_seq_len"])
    if bad:
        raise ConfigError(f"cannot import this {arch}: {'; '.join(bad)}")
    return section


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def import_plan(m: ModelConfig, present: set[str]) -> dict[str, tuple[tuple[str, ...], Callable]]:
    """hpcmega parameter -> (HF tensors read, function making it): one tensor each, unchanged."""
    return {ours: ((theirs,), _same) for ours, theirs in names(m).items()}


def ignored_hf_tensor(m: ModelConfig, name: str) -> bool:
    """RoPE frequency buffers older checkpoints saved, and a tied model's copy of its embedding as lm_head."""
    return name.endswith("rotary_emb.inv_freq") or (m.tie_embeddings and name == _HEAD[1])


# -- export ---------------------------------------------------------------------------------------------------------
def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF tensor names -> contiguous fp32 CPU tensors of the full model."""
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    pairs = names(model.cfg)
    missing = sorted(set(pairs) - set(sd))
    extra = sorted(set(sd) - set(pairs))
    if missing or extra:
        raise ConfigError(f"cannot export to {hf_architecture(model.cfg)}: "
                          + (f"the model has no {', '.join(missing[:3])} (a pipeline stage, not the full model?)"
                             if missing else f"{', '.join(extra[:3])}: no Hugging Face counterpart"))
    return {theirs: sd[ours].contiguous().clone() for ours, theirs in pairs.items()}


def _rope_scaling(m: ModelConfig) -> dict[str, Any]:
    if not m.rope_scaling:
        return {"rope_type": "default"}
    return {"rope_type": "llama3", **{theirs: getattr(m, ours) for ours, theirs in _LLAMA3_ROPE}}


def hf_architecture(m: ModelConfig) -> str:
    """Llama biases o_proj whenever it biases q/k/v; Qwen2 biases q/k/v only, as hpcmega's ``qkv_bias`` does."""
    return "Qwen2ForCausalLM" if m.qkv_bias else "LlamaForCausalLM"


def hf_config(model: torch.nn.Module) -> dict[str, Any]:
    m = model.cfg
    arch = hf_architecture(m)
    config = {
        "architectures": [arch],
        "model_type": "qwen2" if m.qkv_bias else "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.ffn,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,  # read by transformers 4.x (with rope_scaling); 5.x reads rope_parameters
        "rope_parameters": {"rope_theta": m.rope_theta, **_rope_scaling(m)},
        "tie_word_embeddings": m.tie_embeddings,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
    }
    if m.rope_scaling:
        config["rope_scaling"] = _rope_scaling(m)
    if m.qkv_bias:
        config.update(use_sliding_window=False, sliding_window=None)
    else:
        config.update(attention_bias=False, mlp_bias=False)
    return config
