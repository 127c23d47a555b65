"""The fake-process-group seam: one process is rank 5 of 64, and it is the only use of torch's private FakeStore."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hpcmega.parallel.fake_world import fake_mesh, fake_world

PACKAGE = Path(__file__).resolve().parents[1] / "hpcmega"


def test_one_process_stands_in_for_rank_5_of_64():
    with fake_world(64, rank=5):
        assert dist.get_world_size() == 64 and dist.get_rank() == 5
        mesh = fake_mesh(4, 2, 8)
        assert list(mesh.get_coordinate()) == [0, 0, 5]  # tp fastest: rank 5 is tp rank 5 of the first tp group
        assert mesh["tp"].size() == 8 and mesh["pp"].size() == 4
        t = torch.ones(3)
        dist.all_reduce(t)  # returns at once, moves nothing
        with pytest.raises(RuntimeError, match="already initialised"):
            with fake_world(2):
                pass
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="use a new process for rank 6"):
        with fake_world(64, rank=6):
            pass


def test_fake_store_is_imported_in_one_place_only():
    users = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
             if "torch.testing._internal" in p.read_text()]
    assert users == ["parallel/fake_world.py"]
