"""Text generation from a trained checkpoint on one process, with the tokenizer its data was prepared with (GPT-2's
by default; hpcmega.data.tokenizer).

Deliberately simple: the whole context is re-run for every new token (no KV cache), which is fine for a look at
what a model has learned, not for serving. Logits of the padding ids beyond the tokenizer's vocabulary (GPT-2's 50257
tokens in a 50304 embedding) are never sampled. Temperature 0 is greedy decoding; otherwise sampling draws from a generator seeded by ``seed``,
so the same command prints the same text.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from hpcmega.errors import ConfigError
from hpcmega.data.tokenizer import Tokenizer, load_tokenizer


def prompt_ids(model: nn.Module, prompt: str, tok: Tokenizer) -> list[int]:
    """The prompt's token ids; an empty prompt starts a new document (end-of-text), as GPT-2 does."""
    if model.cfg.vocab_size < tok.vocab_size:
        raise ConfigError(f"this model's vocabulary ({model.cfg.vocab_size}) is smaller than the {tok.name} "
                          f"tokenizer's {tok.vocab_size} tokens (trained on synthetic tokens?); sampling text needs a "
                          "model trained on `hpcmega data prepare` shards with --vocab-size "
                          f"{-(-tok.vocab_size // 64) * 64}")
    ids = tok.encode(prompt) if prompt else [tok.eot_id]
    if len(ids) >= model.cfg.max_seq_len:
        raise ConfigError(f"the prompt is {len(ids)} tokens; this model reads at most {model.cfg.max_seq_len - 1} "
                          "plus one new token: shorten --prompt")
    return ids


@torch.no_grad()
def generate(model: nn.Module, ids: list[int], max_new_tokens: int, temperature: float, seed: int,
             tok: Tokenizer) -> list[int]:
    """New token ids after ``ids`` (stops early at the end-of-text id)."""
    gen = torch.Generator().manual_seed(seed)
    context = torch.tensor([ids])
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(context[:, -model.cfg.max_seq_len:])[0, -1, :tok.vocab_size].float()
        if temperature == 0:
            token = int(logits.argmax())
        else:
            token = int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=gen))
        if token == tok.eot_id:
            break
        new.append(token)
        context = torch.cat([context, torch.tensor([[token]])], dim=1)
    return new


def sample_text(model: nn.Module, prompt: str, max_new_tokens: int, temperature: float, seed: int,
                tokenizer: Tokenizer | None = None) -> str:
    """The prompt followed by the generated continuation, as text (GPT-2's tokenizer unless told)."""
    tok = tokenizer or load_tokenizer("gpt2")
    ids = prompt_ids(model, prompt, tok)
    return prompt + tok.decode(generate(model, ids, max_new_tokens, temperature, seed, tok))
