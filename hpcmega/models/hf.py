"""Hugging Face folders in and out, for every family: `ckpt import --from hf` streams a ``config.json`` +
``*.safetensors`` folder into a DCP checkpoint that any layout resumes; `ckpt export --to hf` writes one back.

Why it is built this way:
- **One tensor at a time.** A 70B model does not fit in the memory of the machine that imports it, so nothing here
  holds the model. DCP plans the save over meta-device placeholders (names, shapes, dtypes only); the writer asks
  the planner for each tensor when it writes it (``lookup_object``), and only then is it read from its safetensors
  file and converted, in one copy (dtype and layout together). At most two tensors exist at any moment: the one
  being made or written, and the file tensor it is made from. Two DCP habits would add more, so: the writer puts
  each tensor in its own file (``file_per_tensor``), as it keeps every tensor of a file alive until the file is
  closed; and the writer's loop variable still holds the tensor it wrote last while it asks for the next one, so
  that tensor's memory is released (:class:`Made`) before the next is read -- it is on storage by then, because the
  writer writes one file after another (one thread). tests/test_hf_import.py measures the peak.
- **Plain reads, not mmap.** safetensors' layout is documented and simple (8-byte little-endian header length, a
  JSON header of dtype/shape/byte offsets, raw little-endian data); reading a tensor with ``readinto`` into its own
  buffer keeps the file's pages out of the process's resident memory, where ``safe_open``'s mmap counts them.
- **Everything is checked before anything is written**: the architecture, the settings the block cannot express,
  every tensor the model needs (present, with a shape that converts to the parameter's shape) and every tensor the
  folder holds (each one used or a known buffer). The mapping itself (names, transposes, fused q/k/v, RoPE
  conventions) belongs to each family: ``hpcmega.models.<family>.state_dict_adapter``.
- **The checkpoint is an ordinary one**: written by :class:`hpcmega.checkpoint.store.CheckpointManager` (marker,
  manifest, lineage), its ``meta.json`` holds the model section read from ``config.json``; it is marked
  ``weights_only`` (no optimizer state, no data position), so a run started from it begins at step 0 with a fresh
  optimizer.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import MetadataIndex

from hpcmega.checkpoint.store import CheckpointInfo, CheckpointManager
from hpcmega.config import Config, ModelConfig
from hpcmega.data.tokenizer import EOT_TOKEN, Tokenizer, load_tokenizer, tokenizer_files
from hpcmega.errors import ConfigError
from hpcmega.models import FAMILIES, family_module
from hpcmega.models.common import new_model

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype names -> torch dtypes (the floating ones a model's weights use)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
PARAM_DTYPE = torch.float32  # hpcmega's parameters (master weights) are fp32 in every precision
# A family's adapter: HF_ARCHITECTURES, model_section(config.json) -> model fields, import_plan(model config, tensor
# names) -> {hpcmega name: (HF names, convert)}, ignored_hf_tensor(model config, name) (tensors that are not
# weights: buffers, a tied head's copy); hf_state_dict(model) and hf_config(model) for the export.
ADAPTERS = {arch: adapter for adapter in (family_module(f, "state_dict_adapter") for f in FAMILIES)
            for arch in adapter.HF_ARCHITECTURES}
Plan = dict[str, tuple[tuple[str, ...], Callable[..., torch.Tensor]]]


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies in a safetensors file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def _read_header(path: Path) -> dict[str, Entry]:
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        return {name: Entry(path, e["dtype"], tuple(e["shape"]), 8 + size + e["data_offsets"][0],
                            8 + size + e["data_offsets"][1]) for name, e in header.items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise ConfigError(f"{path} is not a readable safetensors file ({type(e).__name__}); re-download or "
                          "re-save it with save_pretrained") from None


class HFFolder:
    """A Hugging Face model folder: its ``config.json`` and where each tensor is (headers only are read)."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder)
        config = self.path / CONFIG_FILE
        if not config.is_file():
            raise ConfigError(f"{self.path} has no {CONFIG_FILE}; give the folder save_pretrained wrote (config.json "
                              "+ *.safetensors)")
        try:
            self.config: dict[str, Any] = json.loads(config.read_text())
        except ValueError as e:
            raise ConfigError(f"{config} is not JSON ({e}); fix or re-save it") from None
        self.tensors: dict[str, Entry] = {}
        for file in self._weight_files():
            self.tensors.update(_read_header(file))

    def _weight_files(self) -> list[Path]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as e:
                raise ConfigError(f"{index} has no readable weight_map ({type(e).__name__}); fix or re-save it") \
                    from None
            missing = [n for n in names if not (self.path / n).is_file()]
            if missing:
                raise ConfigError(f"{index} names shard(s) that are not in {self.path}: {', '.join(missing)}; "
                                  "download every shard")
            return [self.path / n for n in names]
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"{self.path} has no *.safetensors weights (only safetensors are read, never pickled "
                              ".bin files); re-save with save_pretrained(safe_serialization=True)")
        return files

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return str(archs[0]) if archs else f"(model_type {self.config.get('model_type', '?')})"

    def meta(self, name: str) -> torch.Tensor:
        """A meta-device stand-in of tensor ``name`` (its shape and dtype, no data)."""
        e = self.tensors[name]
        return torch.empty(e.shape, dtype=self._dtype(name), device="meta")

    def _dtype(self, name: str) -> torch.dtype:
        e = self.tensors[name]
        if e.dtype not in DTYPES:
            raise ConfigError(f"tensor {name} in {e.file.name} is {e.dtype}; only floating-point weights "
                              f"({', '.join(DTYPES)}) can be imported")
        return DTYPES[e.dtype]

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` in its own memory, read from its file (no mmap; see the module docstring)."""
        e = self.tensors[name]
        t = torch.empty(e.shape, dtype=self._dtype(name))
        if e.end - e.start != t.numel() * t.element_size():
            raise ConfigError(f"tensor {name} in {e.file} has {e.end - e.start} bytes, its shape {list(e.shape)} "
                              f"{e.dtype} needs {t.numel() * t.element_size()}; the file is damaged")
        with open(e.file, "rb") as f:
            f.seek(e.start)
            if f.readinto(_writable_bytes(t)) != e.end - e.start:
                raise ConfigError(f"{e.file} ends inside tensor {name}; the file is truncated")
        return t


def _writable_bytes(t: torch.Tensor) -> ctypes.Array:
    """The memory of contiguous ``t`` as a writable buffer, for ``readinto``; valid while ``t`` lives. Not through
    ``numpy()``: a tensor once exported to numpy can no longer free its memory early (:class:`Made`)."""
    return (ctypes.c_char * t.nbytes).from_address(t.data_ptr())


def check_plan(folder: HFFolder, plan: Plan, params: dict[str, torch.Tensor], ignored: Callable[[str], bool]) -> None:
    """Refuse (ConfigError naming the tensors) a tensor the model needs that the folder lacks, one whose shape does
    not convert to its parameter's, and one in the folder that nothing uses."""
    missing = sorted({n for names, _ in plan.values() for n in names if n not in folder.tensors})
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ConfigError(f"{folder.path} lacks tensor(s) {', '.join(missing[:5])}{more} that a "
                          f"{folder.architecture} with this config.json has; is the download complete?")
    for name, want in params.items():
        names, convert = plan[name]
        try:
            got = tuple(convert(*(folder.meta(n) for n in names)).shape)
        except RuntimeError:  # e.g. a view the shape does not allow
            got = None
        if got != tuple(want.shape):
            shapes = ", ".join(f"{n} {list(folder.tensors[n].shape)}" for n in names)
            raise ConfigError(f"shape mismatch: {shapes} in {folder.path} cannot make {name} {list(want.shape)} "
                              "of the model its config.json describes; the weights and config.json disagree")
    used = {n for names, _ in plan.values() for n in names}
    unused = sorted(n for n in folder.tensors if n not in used and not ignored(n))
    if unused:
        raise ConfigError(f"{folder.path} holds tensor(s) with no counterpart in hpcmega's model: "
                          f"{', '.join(unused[:5])}; this {folder.architecture} has parts hpcmega does not build")


def check_out(url: str) -> None:
    """--out must not exist (an empty folder is fine): an import never mixes with other checkpoints."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path) and (not fs.isdir(path) or fs.ls(path)):
        raise ConfigError(f"--out {url} already exists; pick a new location (an import never writes into an "
                          "existing one)")


class Import:
    """One checked import: the folder, its model config and the plan; :meth:`write` writes the checkpoint."""

    def __init__(self, folder: str | Path, out: str) -> None:
        self.folder = HFFolder(folder)
        adapter = ADAPTERS.get(self.folder.architecture)
        if adapter is None:
            raise ConfigError(f"{self.folder.path}: architecture {self.folder.architecture} is not supported; "
                              f"hpcmega imports {', '.join(sorted(ADAPTERS))}")
        self.cfg = Config()
        for key, value in adapter.model_section(self.folder.config).items():
            setattr(self.cfg.model, key, value)
        self.params = empty_params(self.cfg.model)
        self.plan: Plan = adapter.import_plan(self.cfg.model, set(self.folder.tensors))
        check_plan(self.folder, self.plan, self.params, partial(adapter.ignored_hf_tensor, self.cfg.model))
        self.out = out if "://" in out else os.path.abspath(out)
        check_out(self.out)
        self.made = Made()

    def tensor(self, name: str) -> torch.Tensor:
        """hpcmega's tensor ``name``: fp32, contiguous and in memory of its own (a slice of a fused HF tensor is
        copied out), made after the previous one's memory is released; the HF tensors read are dropped on return."""
        self.made.release()
        names, convert = self.plan[name]
        t = convert(*(self.folder.read(n) for n in names)).to(PARAM_DTYPE, memory_format=torch.contiguous_format)
        return self.made.hold(t if t.untyped_storage().nbytes() == t.nbytes else t.clone())

    def write(self) -> CheckpointInfo:
        """The checkpoint at ``<out>/step-00000000``, streamed; on failure the half-written location is removed."""
        import fsspec

        placeholders = {f"model.{name}": torch.empty(p.shape, dtype=PARAM_DTYPE, device="meta")
                        for name, p in self.params.items()}
        meta = {"layout": {"pp": 1, "dp": 1, "tp": 1, "world_size": 1}, "config": self.cfg.to_dict(),
                "weights_only": True, "imported_from": {"format": "hf", "folder": str(self.folder.path.absolute()),
                                                        "architecture": self.folder.architecture}}
        try:
            with one_process_group():
                ckpt = CheckpointManager(self.out, keep=1)
                ckpt.begin(None)
                return ckpt.save(0, {"model": placeholders}, meta, planner=StreamingPlanner(self.tensor),
                                 file_per_tensor=True)
        except BaseException:
            fs, path = fsspec.core.url_to_fs(self.out)
            if fs.exists(path):
                fs.rm(path, recursive=True)
            raise


class Made:
    """The tensor handed to DCP's writer last. :meth:`release` frees its memory (``untyped_storage().resize_(0)``,
    what FSDP does to free unsharded parameters): the writer has written it by the time it asks for the next, but
    still holds it. Only for the serial writer of :meth:`Import.write` (one thread, one tensor per file)."""

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None

    def hold(self, t: torch.Tensor) -> torch.Tensor:
        self.tensor = t
        return t

    def release(self) -> None:
        if self.tensor is not None:
            self.tensor.untyped_storage().resize_(0)
            self.tensor = None


def empty_params(m: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's parameters by name, on the meta device (shapes only)."""
    with torch.device("meta"):
        return dict(new_model(m).state_dict())


class StreamingPlanner(DefaultSavePlanner):
    """DCP's planner over meta-device placeholders: a tensor is made (read, converted) only when the writer asks
    for it, through ``lookup_object``, the planner's documented extension point."""

    def __init__(self, make: Callable[[str], torch.Tensor]) -> None:
        super().__init__()
        self.make = make

    def lookup_object(self, index: MetadataIndex) -> Any:
        obj = super().lookup_object(index)
        if isinstance(obj, torch.Tensor) and obj.is_meta:
            return self.make(index.fqn.removeprefix("model.model."))  # {"model": {"model.<name>": ...}}, flattened
        return obj


@contextmanager
def one_process_group() -> Iterator[None]:
    """A one-rank gloo group, so this process writes through the same collective checkpoint code as a run."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# -- export ---------------------------------------------------------------------------------------------------------
WEIGHTS_FILE = "model.safetensors"


def write_gpt2_tokenizer(out: Path, max_len: int) -> None:
    """GPT-2's own vocab.json/merges.txt (the files hpcmega's tokenizer is built from) and their settings."""
    for name, src in tokenizer_files().items():
        shutil.copyfile(src, out / name)
    special = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    settings = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_len, "add_prefix_space": False,
                "add_bos_token": False, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=1))


def write_tokenizer(out: Path, tok: Tokenizer, max_len: int) -> None:
    """``tok`` as transformers' AutoTokenizer loads it: GPT-2's own files, or the tokenizer.json the run's data was
    prepared with, with its tokenizer_config.json / special_tokens_map.json when they lie beside it (else a minimal
    config naming its end-of-text token)."""
    if tok.spec == "gpt2":
        write_gpt2_tokenizer(out, max_len)
        return
    src = Path(tok.spec)
    shutil.copyfile(src, out / "tokenizer.json")
    beside = [src.with_name(n) for n in ("tokenizer_config.json", "special_tokens_map.json")]
    for extra in (f for f in beside if f.is_file()):
        shutil.copyfile(extra, out / extra.name)
    if not beside[0].is_file():
        settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
                    "eos_token": tok.decode([tok.eot_id])}
        (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=1))


def export_hf(model: nn.Module, out: str | Path, tokenizer: Tokenizer | None = None) -> list[str]:
    """Write ``model`` (the full model, any family) as a Hugging Face folder: config.json, model.safetensors (fp32)
    and the tokenizer its data was prepared with (default GPT-2's) when the model's vocabulary holds it. Everything
    is checked before anything is written; returns notes for the user (e.g. why no tokenizer was written)."""
    from safetensors.torch import save_file

    tok = tokenizer or load_tokenizer("gpt2")
    adapter = family_module(model.cfg.family, "state_dict_adapter")
    tensors, config = adapter.hf_state_dict(model), adapter.hf_config(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    if model.cfg.vocab_size < tok.vocab_size:
        return [f"no tokenizer files: the model's vocabulary ({model.cfg.vocab_size}) is smaller than the "
                f"{tok.name} tokenizer's {tok.vocab_size} tokens (trained on synthetic tokens, not `hpcmega data "
                "prepare` shards)"]
    write_tokenizer(out, tok, model.cfg.max_seq_len)
    return []
