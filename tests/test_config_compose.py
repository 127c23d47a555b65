"""Configs that compose: site profile + launch configs merged left to right, flags, --set for every field, and
`config show` with derived values and sources. Every field is declared once (hpcmega.config); these tests check
that flags, TOML checks and validation follow the declarations."""
from __future__ import annotations

import os
import tomllib

import pytest
from click.testing import CliRunner
from conftest import REPO

from hpcmega.cli import main
from hpcmega.commands.options import field_flags
from hpcmega.config import FIELDS, Config, get_value, load_config, parse_set
from hpcmega.errors import ConfigError
from hpcmega.planning.validate import validate

SITE = str(REPO / "slurm/sites/example.toml")
LAUNCH = str(REPO / "launch/gpt2-124m-4node.toml")


def show(args: list[str], cwd=None) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["config", "show", *args], catch_exceptions=False)
    return result.exit_code, result.output


def sourced(output: str) -> dict[str, tuple[str, str]]:
    """`config show --sources` -> {dotted key: (value text, source)}."""
    out, section = {}, ""
    for line in output.splitlines():
        if line.startswith("["):
            section = line.strip("[]") + "."
        elif "=" in line:
            left, _, source = line.partition(" # ")
            key, _, value = left.partition("=")
            out[section + key.strip()] = (value.strip(), source.strip())
    return out


def test_site_profile_then_launch_config_merge_left_to_right_with_sources(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = show(["--site", "example", "--config", LAUNCH, "--partition", "big", "--set", "train.lr=3e-4",
                      "--sources"])
    assert code == 0, out
    rows = sourced(out)
    assert rows["cluster.account"] == ('"my-project"', SITE)  # only the site sets it
    assert rows["cluster.time"] == ('"24:00:00"', LAUNCH)  # both set it: the later file wins
    assert rows["cluster.signal_grace_s"] == ("300", LAUNCH)
    assert rows["cluster.cpus_per_task"] == ("12", SITE)
    assert rows["cluster.partition"] == ('"big"', "flag --partition")
    assert rows["train.lr"] == ("0.0003", "--set")
    assert rows["train.min_lr"] == ("6e-05", LAUNCH)
    assert rows["model.d_model"] == ("768", "preset gpt2-124m")
    assert rows["model.preset"] == ('"gpt2-124m"', LAUNCH)
    assert rows["train.beta1"] == ("0.9", "default")
    # derived values are written out: 4 nodes x 8 GPUs / (tp 4 x pp 2) = dp 4; 512 / (4 x 8) = 16 microbatches
    assert rows["parallel.dp"] == ("4", "derived") and rows["parallel.microbatches"] == ("16", "derived")
    assert rows["run_dir"][1] == "derived" and "gpt2-124m (not created)" in rows["run_dir"][0]
    assert os.listdir(tmp_path) == []


def test_show_without_sources_is_valid_toml_of_the_resolved_config():
    code, out = show(["--site", "example", "--config", LAUNCH, "--run-dir", "/scratch/r1"])
    assert code == 0, out
    data = tomllib.loads(out)
    assert data["run_dir"] == "/scratch/r1" and data["parallel"]["dp"] == 4
    assert data["cluster"]["sbatch_extra"] == ["--reservation=my-reservation", "--gpu-bind=none"]


def test_list_flags_add_to_the_files_list_and_set_replaces_it():
    code, out = show(["--site", "example", "--sbatch=--comment=x"])
    assert tomllib.loads(out)["cluster"]["sbatch_extra"] == ["--reservation=my-reservation", "--gpu-bind=none",
                                                             "--comment=x"]
    code, out = show(["--site", "example", "--set", 'cluster.sbatch_extra=["--comment=y"]'])
    assert tomllib.loads(out)["cluster"]["sbatch_extra"] == ["--comment=y"]


def test_every_field_has_help_and_is_reachable_by_set_and_by_a_flag_unless_internal():
    flags = {f.key for f in field_flags(with_cluster=True)}
    for key, info in FIELDS.items():
        assert info.spec.help, key
        assert key in flags or info.spec.flag is None, key
    decls = [f.flag for f in field_flags(with_cluster=True)]
    assert len(decls) == len(set(decls)), "two fields share a flag"
    # fields that had no flag before the declarations: now they do
    for flag in ("--min-lr", "--weight-decay", "--grad-clip", "--wandb-entity", "--log-every", "--max-requeues",
                 "--signal-grace-s"):
        assert flag in decls, flag


@pytest.mark.parametrize("item, key, value", [
    ("train.min_lr=1e-5", "train.min_lr", 1e-5),
    ("parallel.sequence_parallel=false", "parallel.sequence_parallel", False),
    ("cluster.time=1-00:00:00", "cluster.time", "1-00:00:00"),
    ("logging.run_name=123", "logging.run_name", "123"),
    ("cluster.max_requeues=7", "cluster.max_requeues", 7),
])
def test_set_reads_values_as_the_field_type(item, key, value):
    cfg = load_config(None, parse_set([item]))
    assert get_value(cfg, key) == value and type(get_value(cfg, key)) is type(value)


@pytest.mark.parametrize("args, words", [
    (["--set", "train.lrr=1"], ["unknown config key 'train.lrr'", "did you mean 'train.lr'"]),
    (["--set", "train.lr"], ["--set 'train.lr'", "section.key=value"]),
    (["--set", "train.steps=many"], ["train.steps (--steps)", "cannot read 'many' as int"]),
    (["--set", "train.beta1=1.5"], ["train.beta1 (--adam-beta1)=1.5 must be in [0, 1)"]),
    (["--site", "nowhere"], ["site 'nowhere' not found", "example"]),
    (["--weight-decay", "-1"], ["train.weight_decay (--weight-decay)=-1.0 must be 0 or more"]),
])
def test_bad_values_exit_2_with_one_line_naming_the_fix(args, words):
    result = CliRunner().invoke(main, ["plan", *args])
    assert result.exit_code == 2, result.output
    error = result.output.rstrip("\n").splitlines()[-1]
    for word in words:
        assert word in error, (word, error)


def test_unknown_toml_key_names_the_file_and_the_closest_key(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text("[train]\nmin_lrr = 1e-5\n")
    with pytest.raises(ConfigError, match=r"c.toml: unknown config key 'train.min_lrr'; did you mean 'train.min_lr'"):
        load_config(conf)


def test_preset_on_the_command_line_replaces_a_files_model_shape_but_not_its_other_values(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text('[model]\npreset = "tiny"\nd_model = 128\n[train]\nsteps = 7\n')
    same = load_config(conf, {"model.preset": "tiny"})
    other = load_config(conf, {"model.preset": "gpt2-124m"})
    assert same.model.d_model == 128 and other.model.d_model == 768 and other.train.steps == 7


def test_config_round_trips_through_the_run_folders_toml():
    cfg = load_config([SITE, LAUNCH], {"train.lr": 1e-4})
    again = Config.from_dict(tomllib.loads(cfg.to_toml()))
    assert again == cfg
    assert validate(again) == []


def test_dict_fields_merge_key_by_key_across_sources(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text('[cluster.env]\nA = "1"\nB = "2"\n')
    code, out = show(["--config", str(conf), "--env", "B=3", "--set", "cluster.env.C=4 5"])
    assert code == 0, out
    assert tomllib.loads(out)["cluster"]["env"] == {"A": "1", "B": "3", "C": "4 5"}
