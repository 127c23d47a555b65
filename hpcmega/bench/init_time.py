"""How long one rank of a big job takes to build and initialise its model parts: ``python -m hpcmega.bench.init_time``.

One CPU process stands in for rank ``--rank`` of the whole job on the fake process group
(:mod:`hpcmega.parallel.fake_world`): ``build_model_parts`` runs exactly as on that rank (meta device, TP, FSDP2,
``to_empty``, initialisation of the local shards), so the time is the start-up cost a GPU job pays per rank before
its first step, minus the device. Reports wall and CPU time (``time.process_time``: on a shared machine wall time
also measures the neighbours), the rank's local parameter count and the rate.

Example: ``python -m hpcmega.bench.init_time --model gpt-7b --nodes 4 --gpus-per-node 8 --tp 8 --pp 2``.
"""
from __future__ import annotations

import argparse
import json
import time


def measure(model: str, nodes: int, gpus_per_node: int, tp: int, pp: int, rank: int) -> dict:
    import torch

    from hpcmega.config import load_config, resolve_defaults
    from hpcmega.parallel.fake_world import fake_mesh, fake_world
    from hpcmega.parallel.parallelize import build_model_parts

    torch.set_num_threads(1)
    cfg = load_config(None, {"model.preset": model, "cluster.nodes": nodes, "cluster.gpus_per_node": gpus_per_node,
                             "parallel.tp": tp, "parallel.pp": pp})
    resolve_defaults(cfg, on_gpu=True)  # a GPU job's settings (bf16: FSDP2 wraps even at dp = 1)
    with fake_world(cfg.world_size, rank=rank):
        wall, cpu = time.perf_counter(), time.process_time()
        parts = build_model_parts(cfg, fake_mesh(pp, cfg.dp, tp), torch.device("cpu"))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        local = sum(p.to_local().numel() for p in parts.parameters())
    return {"model": model, "world": cfg.world_size, "tp": tp, "pp": pp, "dp": cfg.dp, "rank": rank,
            "stages": parts.stage_ids, "local_params": local, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "local_values_per_cpu_s": round(local / cpu)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m hpcmega.bench.init_time", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt-7b")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--rank", type=int, default=0, help="the rank to build (0: pipeline stage 0, embeddings)")
    args = parser.parse_args()
    print(json.dumps(measure(args.model, args.nodes, args.gpus_per_node, args.tp, args.pp, args.rank)))


if __name__ == "__main__":
    main()
