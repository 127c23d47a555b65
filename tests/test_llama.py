"""The llama-family block is the model Hugging Face's transformers computes, under the names docs promise.

A randomly initialised ``LlamaForCausalLM`` (and ``Qwen2ForCausalLM`` for q/k/v biases) is built locally (no
download); its weights are copied into hpcmega's ``Llama`` by the name mapping of hpcmega.models.llama.model's
docstring, and both must give the same logits. The published Llama 3 parameter counts pin the presets, the planner's
count and the module's count to each other.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hpcmega.config import ModelConfig, load_config
from hpcmega.models.llama.model import Llama
from hpcmega.planning.estimate import Shape, total_params
from hpcmega.planning.families import BlockShape
from hpcmega.planning.flops import model_flops_per_step

transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab_size=512, d_model=128, n_layers=2, n_heads=8, n_kv_heads=2, ffn_hidden=384, max_seq_len=64)


def hf_name(name: str) -> str:
    """hpcmega name -> LlamaForCausalLM name (the table in hpcmega.models.llama.model)."""
    for ours, theirs in (("tok_emb.", "model.embed_tokens."), ("ln_f.", "model.norm."), ("head.", "lm_head."),
                         ("blocks.", "model.layers."), (".ln1.", ".input_layernorm."),
                         (".ln2.", ".post_attention_layernorm."), (".attn.wq.", ".self_attn.q_proj."),
                         (".attn.wk.", ".self_attn.k_proj."), (".attn.wv.", ".self_attn.v_proj."),
                         (".attn.wo.", ".self_attn.o_proj."), (".mlp.gate.", ".mlp.gate_proj."),
                         (".mlp.up.", ".mlp.up_proj."), (".mlp.down.", ".mlp.down_proj.")):
        name = name.replace(ours, theirs)
    return name


@pytest.mark.parametrize("tied, qkv_bias", [(False, False), (True, False), (False, True)])
def test_logits_equal_transformers(tied, qkv_bias):
    kw = dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
              intermediate_size=384, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied,
              max_position_embeddings=64)
    torch.manual_seed(0)
    if qkv_bias:  # Qwen2: biases on q, k, v only
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw)).eval()
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    ours = Llama(ModelConfig(family="llama", tie_embeddings=tied, qkv_bias=qkv_bias, rope_theta=10000.0,
                             **SHAPE)).eval()
    theirs = hf.state_dict()
    names = [name for name, _ in ours.named_parameters()]
    assert {hf_name(n) for n in names} == {n for n, _ in hf.named_parameters()}  # one-to-one, tied or not
    with torch.no_grad():
        for name, param in ours.named_parameters():
            param.copy_(theirs[hf_name(name)])
        ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("preset, published", [
    ("llama3.2-1b", 1_235_814_400), ("llama3-8b", 8_030_261_248), ("llama3-70b", 70_553_706_496),
])
def test_presets_have_the_published_parameter_counts(preset, published):
    cfg = load_config(None, {"model.preset": preset})
    assert total_params(Shape.from_config(cfg)) == published  # the planner's count
    with torch.device("meta"):
        model = Llama(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == published  # the module's


def test_flops_formula_matches_the_model_as_executed():
    cfg = ModelConfig(family="llama", **SHAPE)
    b, s = 2, 32
    model = Llama(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with counter:
        torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(n for op, n in counts.items() if str(op) in ("aten.mm", "aten.addmm", "aten.bmm"))
    attention_core = 3 * 4 * b * s * s * cfg.d_model * cfg.n_layers  # fused CPU attention is not counted
    expected = model_flops_per_step(b, s, cfg.n_layers, cfg.d_model, cfg.vocab_size, BlockShape.of(cfg).matmul_params())
    assert matmuls + attention_core == pytest.approx(expected, rel=1e-12)
