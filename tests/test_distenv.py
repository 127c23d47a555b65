"""hpcmega.cluster.distenv: what a rank concludes about itself from SLURM's or the local launcher's environment."""
from __future__ import annotations

import subprocess

import pytest

from hpcmega.errors import ConfigError
from hpcmega.cluster.distenv import (
    DERIVED_PORT_BASE,
    DERIVED_PORT_SPAN,
    derived_port,
    expand_nodelist,
    from_environment,
    parse_hostlist,
    parse_tasks_per_node,
)

# What srun sets for task 5 of a 3-node x 4-task job (the variables distenv reads, as SLURM 22.05 names them).
SLURM_TASK = {
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS": "12",
    "SLURM_STEP_NUM_TASKS": "12",
    "SLURMD_NODENAME": "gpu-b02",
    "SLURM_JOB_NODELIST": "gpu-a07,gpu-b[02-03]",
    "SLURM_STEP_NODELIST": "gpu-a07,gpu-b[02-03]",
    "SLURM_TASKS_PER_NODE": "4(x3)",
    "SLURM_STEP_TASKS_PER_NODE": "4(x3)",
    "SLURM_RESTART_COUNT": "2",
}


def test_slurm_task_environment():
    env = from_environment(SLURM_TASK)
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (5, 1, 12, 4)
    assert env.node == "gpu-b02"
    assert env.master_addr == "gpu-a07"  # the first node of the step holds rank 0
    assert env.master_port == derived_port("4242")
    assert (env.job_id, env.restart_count, env.under_slurm) == ("4242", 2, True)


def test_configured_master_port_wins_over_the_derived_one():
    assert from_environment(SLURM_TASK, master_port=29500).master_port == 29500


def test_derived_port_is_per_job_and_outside_the_ephemeral_range():
    ports = {derived_port(str(j)) for j in range(1, 1001)}
    assert len(ports) == 1000  # consecutive jobs on a shared node never collide
    assert all(DERIVED_PORT_BASE <= p < DERIVED_PORT_BASE + DERIVED_PORT_SPAN < 32768 for p in ports)
    # every task of a job and every requeue of it computes the same port
    other_task = {**SLURM_TASK, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURMD_NODENAME": "gpu-a07",
                  "SLURM_NODEID": "0", "SLURM_RESTART_COUNT": "0"}
    assert from_environment(other_task).master_port == from_environment(SLURM_TASK).master_port
    assert derived_port("4242_7") != derived_port("4243")  # array tasks too


def test_uneven_tasks_per_node():
    env = from_environment({**SLURM_TASK, "SLURM_STEP_TASKS_PER_NODE": "4,2,6", "SLURM_NODEID": "2",
                            "SLURMD_NODENAME": "gpu-b03", "SLURM_LOCALID": "5"})
    assert env.local_world_size == 6
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(ConfigError):
        parse_tasks_per_node("two")


def test_launcher_environment():
    env = from_environment({"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4",
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29411", "HPCMEGA_NODE": "laptop"})
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (3, 3, 4, 4)
    assert (env.node, env.master_addr, env.master_port, env.job_id) == ("laptop", "127.0.0.1", 29411, None)
    assert not env.under_slurm


def test_local_run_inside_an_allocation_is_a_local_run():
    # `hpcmega run` from an sbatch script: the batch step's SLURM variables are present but the launcher's win,
    # and there is no job to requeue from a local rank.
    env = from_environment({**SLURM_TASK, "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2",
                            "MASTER_PORT": "29411", "HPCMEGA_NODE": "gpu-b02"})
    assert (env.rank, env.world_size, env.job_id, env.master_addr) == (1, 2, None, "127.0.0.1")


def test_plain_process_is_a_world_of_one():
    env = from_environment({})
    assert (env.rank, env.local_rank, env.world_size, env.job_id) == (0, 0, 1, None)


@pytest.mark.parametrize("env, fragment", [
    ({"RANK": "4", "WORLD_SIZE": "4", "MASTER_PORT": "1234"}, "rank 4 of 4"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_PORT"),
    ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "RANK='x'"),
    ({**SLURM_TASK, "SLURM_JOB_ID": ""}, "SLURM_JOB_ID"),
])
def test_inconsistent_environment_is_refused(env, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        from_environment(env)


HOSTLISTS = ["node[1-2]", "node1", "a[01-03],b7", "gpu[001-002,010]", "rack[1-2]-n[1-2]", "x-y", "n[9-11],m3"]


@pytest.mark.slurm
def test_hostlist_parser_agrees_with_scontrol(slurm_cluster):
    for nodelist in HOSTLISTS:
        scontrol = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                  check=True).stdout.split()
        assert parse_hostlist(nodelist) == scontrol, nodelist
        assert expand_nodelist(nodelist) == scontrol


def test_hostlist_without_scontrol(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert expand_nodelist("gpu-b[09-11],a1") == ["gpu-b09", "gpu-b10", "gpu-b11", "a1"]
    assert from_environment({**SLURM_TASK, "SLURM_STEP_NODELIST": "z[3-4]"}).master_addr == "z3"
