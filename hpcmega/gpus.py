"""GPUs as data: memory, dense bf16 peak and link bandwidths, one row per model. Pure Python.

This table is the one owner of per-GPU facts: ``hpcmega plan`` reads memory and bandwidth from it, the training
loop's MFU reads the peak (matched against the CUDA device name). Memory is the usable size torch reports
(``torch.cuda.get_device_properties().total_memory``), a little below the marketing figure in ``label``.
"""
from __future__ import annotations

from dataclasses import dataclass

from hpcmega.errors import ConfigError

# One 400 Gb/s NIC per GPU (InfiniBand NDR / RoCE), the common 8-GPU-node design: bytes/s per GPU between nodes.
INTERNODE_GB_S = 50.0


@dataclass(frozen=True)
class GPU:
    name: str  # what --gpu / cluster.gpu accepts
    label: str
    memory_gib: float
    bf16_tflops: float  # dense (no sparsity)
    nvlink_gb_s: float  # one-direction bandwidth per GPU inside an NVLink domain (PCIe when there is no NVLink)
    device_names: tuple[str, ...]  # fragments of torch.cuda.get_device_name() that identify this GPU
    aliases: tuple[str, ...] = ()


# Order matters for device-name matching: more specific fragments first ("H100 NVL" before "H100").
GPUS: tuple[GPU, ...] = (
    GPU("gb200", "NVIDIA GB200 (186 GB HBM3e)", 184.0, 2500.0, 900.0, ("GB200",)),
    GPU("b200", "NVIDIA B200 (180 GB HBM3e)", 178.0, 2250.0, 900.0, ("B200",)),
    GPU("gh200", "NVIDIA GH200 (96 GB HBM3)", 94.5, 989.0, 450.0, ("GH200",)),
    GPU("h200", "NVIDIA H200 SXM (141 GB HBM3e)", 139.8, 989.0, 450.0, ("H200",)),
    GPU("h100-nvl", "NVIDIA H100 NVL (94 GB HBM3)", 93.1, 835.0, 300.0, ("H100 NVL",)),
    GPU("h100-pcie", "NVIDIA H100 PCIe (80 GB HBM2e)", 79.2, 756.0, 64.0, ("H100 PCIe",)),
    GPU("h100", "NVIDIA H100 SXM (80 GB HBM3)", 79.1, 989.0, 450.0, ("H100",), ("h100-sxm",)),
    GPU("a100-40", "NVIDIA A100 SXM (40 GB HBM2)", 39.4, 312.0, 300.0, ("A100-SXM4-40GB", "A100-PCIE-40GB")),
    GPU("a100", "NVIDIA A100 SXM (80 GB HBM2e)", 79.2, 312.0, 300.0, ("A100",), ("a100-80",)),
    GPU("l40s", "NVIDIA L40S (48 GB GDDR6)", 44.4, 362.0, 32.0, ("L40S",)),
)


def get_gpu(name: str) -> GPU:
    key = name.strip().lower()
    for gpu in GPUS:
        if key == gpu.name or key in gpu.aliases:
            return gpu
    raise ConfigError(f"unknown GPU {name!r}; use one of: {', '.join(g.name for g in GPUS)} "
                      "(or --gpu-mem-gib to give the memory)")


GPU_NAMES: tuple[str, ...] = tuple(n for g in GPUS for n in (g.name, *g.aliases))


def gpu_for_device_name(device_name: str | None) -> GPU | None:
    """The table row for a CUDA device name such as "NVIDIA H100 80GB HBM3", or None when unlisted."""
    if not device_name:
        return None
    low = device_name.lower()
    return next((g for g in GPUS if any(f.lower() in low for f in g.device_names)), None)
