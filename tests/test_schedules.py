"""The schedule table (hpcmega/schedules.py) against torch's classes and the docs, and the facts derived from it:
stages per rank, placement, microbatch limits, bubble, and FSDP2's reshard-after-forward default under PP."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from hpcmega.config import Config, resolve_defaults
from hpcmega.errors import ConfigError
from hpcmega.planning.stages import stage_ids_for_rank
from hpcmega.planning.schedule_facts import bubble_fraction
from hpcmega.schedules import SCHEDULES, names
from hpcmega.planning.validate import validate

DOCS = Path(__file__).resolve().parents[1] / "docs" / "engine.md"


def _cfg(**kw) -> Config:
    cfg = Config()
    for dotted, value in kw.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    resolve_defaults(cfg, on_gpu=False)
    return cfg


@pytest.mark.parametrize("name", SCHEDULES)
def test_each_entry_names_a_torch_class_of_the_right_kind(name):
    import torch.distributed.pipelining as pipelining
    import torch.distributed.pipelining.schedules as torch_schedules

    facts = SCHEDULES[name]
    cls = getattr(pipelining, facts.torch_class)  # where hpcmega.parallel.pipeline looks it up
    base = torch_schedules.PipelineScheduleMulti if facts.multi_stage else torch_schedules.PipelineScheduleSingle
    assert issubclass(cls, base), (name, cls.__mro__)


def test_docs_table_lists_every_schedule_with_its_class():
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w-]+)`[^|]*\| `(\w+)`", DOCS.read_text(), re.M)}
    assert rows == {name: s.torch_class for name, s in SCHEDULES.items()}


def test_stages_per_rank_and_placement_come_from_the_table():
    assert _cfg(parallel__schedule="1f1b", parallel__virtual_stages=1).stages_per_rank == 1
    assert _cfg(parallel__schedule="interleaved-1f1b", parallel__virtual_stages=3).stages_per_rank == 3
    assert _cfg(parallel__schedule="zbv", parallel__virtual_stages=1).stages_per_rank == 2
    for name in names(v_shape=True):
        assert stage_ids_for_rank(0, 4, 2, name) == [0, 7]
    for name in names(v_shape=False):
        assert stage_ids_for_rank(1, 4, SCHEDULES[name].stages_on_each_rank(2), name)[0] == 1


def test_microbatch_limits_and_bubble():
    base = dict(cluster__gpus_per_node=2, parallel__pp=2, train__micro_batch=1)
    with pytest.raises(ConfigError, match=r"dualpipev needs one microbatch per stage \(2 x pp\)"):
        validate(_cfg(**base, parallel__schedule="dualpipev", train__global_batch=2))
    validate(_cfg(**base, parallel__schedule="dualpipev", train__global_batch=4))
    with pytest.raises(ConfigError, match="multiple of pp=2"):
        validate(_cfg(**base, parallel__schedule="zbv", train__global_batch=3))
    validate(_cfg(**base, parallel__schedule="1f1b", train__global_batch=3))  # 1F1B takes any m >= pp
    assert bubble_fraction("1f1b", 4, 1, 12) == pytest.approx(3 / 15)
    assert bubble_fraction("interleaved-1f1b", 4, 2, 12) == pytest.approx(3 / 27)  # v stages per rank from the table
    assert bubble_fraction("gpipe", 4, 2, 12) == pytest.approx(3 / 15)  # single-stage: v does not apply


@pytest.mark.parametrize(
    "pp, schedule, explicit, expected",
    [
        (1, "1f1b", None, True),  # auto without PP: ZeRO-3
        (2, "1f1b", None, False),  # auto with PP: no re-gather per microbatch
        (4, "interleaved-1f1b", None, False),
        (2, "1f1b", True, True),  # an explicit setting wins ...
        (1, "1f1b", False, False),
        (2, "zbv", True, False),  # ... except where resharding would lose gradients (split backward)
        (2, "zero-bubble", None, False),
        (1, "zbv", True, True),  # no pipeline, no split backward
    ],
)
def test_reshard_after_forward(pp, schedule, explicit, expected):
    cfg = _cfg(parallel__pp=pp, parallel__schedule=schedule, parallel__reshard_after_forward=explicit)
    assert cfg.reshard_after_forward is expected


def test_reshard_setting_round_trips_through_toml_and_flags():
    from hpcmega.config import load_config

    cfg = Config()
    assert cfg.parallel.reshard_after_forward is None
    assert 'reshard_after_forward = "auto"' in cfg.to_toml()
    assert load_config(overrides={"parallel.reshard_after_forward": "auto"}).parallel.reshard_after_forward is None
    assert load_config(overrides={"parallel.reshard_after_forward": False}).parallel.reshard_after_forward is False
    assert load_config(overrides={"parallel.reshard_after_forward": "on"}).parallel.reshard_after_forward is True
    with pytest.raises(ConfigError, match="reshard_after_forward"):
        load_config(overrides={"parallel.reshard_after_forward": "sometimes"})
