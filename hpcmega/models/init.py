"""Layout-independent random initialisation that scales with the shard: tiled, name-seeded normal streams.

Every model family initialises its weights through :func:`normal_`: the value of element (i, j) of a parameter
depends only on the seed, the parameter's full-model name and (i, j) -- never on how the parameter is split -- so
every layout (any tp, pp, dp, FSDP2 or not) starts from the values of the single-process model, and each rank
draws only (about) its own shard.

Design for exactness: the full parameter, viewed as a matrix (a vector is one row), is cut into fixed tiles of
``TILE`` = 16 rows x 256 columns (edge tiles are smaller; tile boundaries depend on the global shape only). Tile
(a, b) is drawn with ``torch.randn`` from its own generator, seeded by (seed, name, a, b). A rank draws the tiles its
local shard overlaps and copies the overlap: a row-split (``Shard(0)``) or column-split (``Shard(1)``) shard, and a
dp x tp strided one (FSDP2 over a TP shard: still a rectangle), wastes at most one partial tile row or column at
each edge. Tiles are flat (16 rows) because FSDP2 at a large dp leaves a rank few rows of each matrix (gpt-7b at
tp 8, dp 32: 16 rows of wq); 256 columns divide every column-parallel shard of the presets. Drawn on the parameter's
device (fast on a GPU), so values agree across layouts on one device type; a CPU and a GPU run of the same seed start
from different (equally distributed) weights.

Why tiles and not a per-element counter hash: a hash plus an inverse normal CDF runs at ~2 M values/s per CPU
thread here, far slower than ``torch.randn`` (~100 M/s); per-tile generators keep randn's speed and its exact
N(0, 1): 143 M values/s with 4,096-value tiles vs 157 M/s for one large draw (seeding a generator costs ~3 us).

The offsets of a DTensor's local shard come from torch's private
``torch.distributed.tensor._utils.compute_local_shape_and_global_offset``: :func:`local_region` is the one seam
(pinned by tests/test_init_memory.py, which checks that the shards of a dp x tp layout are exactly the pieces of
the single-process parameters).
"""
from __future__ import annotations

import zlib

import torch
from torch.distributed.tensor import DTensor

TILE = (16, 256)  # rows and columns of one tile: 4,096 values


def param_seed(seed: int, name: str) -> int:
    """A seed for one parameter: stable across processes and Python runs (unlike ``hash``)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _tile_seed(base: int, a: int, b: int) -> int:
    return (base * 0x9E3779B97F4A7C15 + a * 0xBF58476D1CE4E5B9 + b * 0x94D049BB133111EB) % (2**63)


def local_region(param: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(global offsets, local sizes) of this rank's part of ``param`` (the whole tensor for a plain one)."""
    if not isinstance(param, DTensor):
        return (0,) * param.dim(), tuple(param.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    sizes, offsets = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(offsets), tuple(sizes)


def _as_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 1:
        return 1, shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    raise ValueError(f"tiled initialisation covers vectors and matrices, not a {len(shape)}-d parameter")


@torch.no_grad()
def normal_(param: torch.Tensor, std: float, seed: int, name: str) -> None:
    """Fill this rank's part of ``param`` with N(0, std^2) values that depend only on (seed, name, element)."""
    local = param.to_local() if isinstance(param, DTensor) else param
    if local.numel() == 0:
        return
    offsets, sizes = local_region(param)
    rows, cols = _as_matrix(tuple(param.shape))
    (r0, c0), (h, w) = ((0, *offsets), (1, *sizes)) if param.dim() == 1 else (offsets, sizes)
    out = local.view(h, w)
    base = param_seed(seed, name)
    tr, tc = TILE
    for a in range(r0 // tr, (r0 + h - 1) // tr + 1):
        top, bottom = a * tr, min((a + 1) * tr, rows)
        for b in range(c0 // tc, (c0 + w - 1) // tc + 1):
            left, right = b * tc, min((b + 1) * tc, cols)
            gen = torch.Generator(device=local.device).manual_seed(_tile_seed(base, a, b))
            tile = torch.randn(bottom - top, right - left, generator=gen, device=local.device)
            i0, i1 = max(top, r0), min(bottom, r0 + h)
            j0, j1 = max(left, c0), min(right, c0 + w)
            out[i0 - r0:i1 - r0, j0 - c0:j1 - c0].copy_(tile[i0 - top:i1 - top, j0 - left:j1 - left].mul_(std))
