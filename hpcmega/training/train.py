"""The training loop on every rank: build the parallel model, then step optimizer, LR schedule, clipping, metrics.

``train(cfg, mesh, run_dir)`` is the entry point (called by ``hpcmega.training.job`` once torch.distributed is up and the
("pp", "dp", "tp") mesh is built). The work lives in :class:`Trainer`, whose pieces are public attributes so the
checkpoint/resume and preemption code can plug in at step boundaries without touching the step itself:

- ``model_parts`` (one module per owned pipeline stage, full-model parameter names), ``optimizers`` (one AdamW per
  part), ``lr_scheduler``, ``loader``, ``step`` (optimizer steps completed so far);
- ``state_for_checkpoint()`` -- the objects a checkpoint must capture;
- ``after_backward_hooks`` -- called as ``hook(trainer)`` once gradients are final (reduced, clipped), before the
  optimizer step; ``step_end_hooks`` -- called as ``hook(trainer, record)`` on every rank after each step;
- ``request_stop()`` -- finish after the current step (every rank must call it at the same step);
- ``evaluate()`` -- ``val_loss`` on the held-out split (``train.eval_every``), added to that step's record.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from hpcmega.config import Config, resolve_defaults
from hpcmega.parallel.evaluate import forward_loss
from hpcmega.parallel.grad_sync import reduce_partial_grads
from hpcmega.parallel.memory import peak_memory_gib
from hpcmega.parallel.parallelize import build_model_parts
from hpcmega.parallel.pipeline import GradAccumulation, PipelineRunner
from hpcmega.parallel.step_guard import StepGuard
from hpcmega.training.metrics import ConsoleLogger, MetricsWriter, peak_tflops, step_record
from hpcmega.planning.families import BlockShape
from hpcmega.planning.dims import ParallelDims
from hpcmega.planning.flops import model_flops_per_step
from hpcmega.planning.validate import check_batch_split
from hpcmega.training.optim import CosineWithWarmup, build_optimizer, clip_grad_norm_
from hpcmega.runs import files
from hpcmega.runs.progress import Progress


def build_data_loader(cfg: Config, split: str = "train"):
    """Synthetic stream or prepared shards, by ``train.data`` (see hpcmega.data)."""
    from hpcmega.data import build_loader

    return build_loader(cfg, split)


def _device(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


class Trainer:
    def __init__(self, cfg: Config, mesh: DeviceMesh, run_dir: str) -> None:
        if tuple(mesh.mesh_dim_names or ()) != ("pp", "dp", "tp"):
            raise ValueError(f"the mesh must have dims ('pp', 'dp', 'tp'), got {mesh.mesh_dim_names}")
        self.cfg, self.mesh, self.run_dir = cfg, mesh, run_dir
        dims = ParallelDims.from_mesh(mesh)
        self.pp, self.dp, self.tp = dims.pp, dims.dp, dims.tp
        for name, want, got in (("tp", cfg.parallel.tp, self.tp), ("pp", cfg.parallel.pp, self.pp)):
            if want != got:
                raise ValueError(f"parallel.{name}={want} but the mesh has {name}={got}")
        self.device = _device(mesh)
        resolve_defaults(cfg, on_gpu=self.device.type == "cuda")  # no-op for a config the CLI already resolved
        self.n_microbatches = check_batch_split(cfg, self.dp)  # this mesh's dp (a Trainer may be built on any)
        self.dp_rank = mesh["dp"].get_local_rank()
        self.pp_group = mesh["pp"].get_group() if self.pp > 1 else None
        self.dp_group = mesh["dp"].get_group() if self.dp > 1 else None

        self.model = build_model_parts(cfg, mesh, self.device)
        self.model_parts = self.model.parts
        self.optimizers = [build_optimizer(part, cfg.train) for part in self.model_parts]
        self.lr_scheduler = CosineWithWarmup(cfg.train.lr, cfg.train.min_lr, cfg.train.warmup_steps, cfg.train.steps)
        self.loader = build_data_loader(cfg)
        self.val_loader = build_data_loader(cfg, "val") if cfg.train.eval_every else None
        if self.pp > 1:
            self.runner: GradAccumulation | PipelineRunner = PipelineRunner(
                self.model, mesh["pp"], cfg.parallel.schedule, self.n_microbatches, self.tp, cfg.parallel.compile
            )
        else:
            self.runner = GradAccumulation(self.model, self.n_microbatches, self.tp)
        self.step = 0
        self.guard = StepGuard(cfg.train.max_consecutive_skips)  # skips steps with a non-finite loss/grad norm
        self.after_backward_hooks: list[Callable[[Trainer], None]] = []
        self.step_end_hooks: list[Callable[[Trainer, dict[str, Any]], None]] = []
        self._stop = False

        self.tokens_per_step = cfg.train.global_batch * cfg.train.seq_len
        m = cfg.model
        self.flops_per_step = model_flops_per_step(
            cfg.train.global_batch, cfg.train.seq_len, m.n_layers, m.d_model, m.vocab_size,
            BlockShape.of(m).matmul_params(),
        )
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        self.peak_tflops = peak_tflops(device_name, cfg.train.precision)
        self.is_logging_rank = dist.get_rank() == 0
        self.metrics = MetricsWriter(os.path.join(run_dir, files.METRICS)) if self.is_logging_rank else None
        self.console = ConsoleLogger(cfg.train.steps) if self.is_logging_rank else None

    # -- pieces for checkpointing and other step-boundary plug-ins -----------------------------------------------
    def state_for_checkpoint(self) -> dict[str, Any]:
        """Everything a resume needs, as live objects (modules and optimizers keep full-model parameter names)."""
        return {
            "model_parts": self.model_parts,
            "optimizers": self.optimizers,
            "lr_scheduler": self.lr_scheduler,
            "loader": self.loader,
            "step": self.step,
        }

    def request_stop(self) -> None:
        self._stop = True

    def parameters(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    # -- one optimizer step -------------------------------------------------------------------------------------
    def _local_batch(self, loader=None, index: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This DP rank's rows of global batch ``index`` (default: the training batch of the current step); the
        loader reads only those rows."""
        step = self.step if index is None else index
        local = (loader or self.loader).local_batch(step, self.dp_rank, self.dp).to(self.device)
        return local[:, :-1].contiguous(), local[:, 1:].contiguous()

    def _global_loss(self, local: torch.Tensor | None) -> float:
        """Mean loss over the whole global batch, the same on every rank: summed from the rank(s) holding the last
        stage over "pp", averaged over "dp" (TP ranks already agree)."""
        loss = local.detach().clone().float() if local is not None else torch.zeros((), device=self.device)
        if self.pp_group is not None:
            dist.all_reduce(loss, group=self.pp_group)
        if self.dp_group is not None:
            dist.all_reduce(loss, group=self.dp_group)
            loss /= self.dp
        return loss.item()

    def train_step(self) -> dict[str, Any]:
        if not self.cfg.logging.comm_stats:
            return self._step()
        from hpcmega.parallel.comm_stats import CommRecorder, gather_summaries

        with CommRecorder(self.mesh) as recorder:
            record = self._step()
        return {**record, **gather_summaries(recorder.summary())}

    def _step(self) -> dict[str, Any]:
        start = time.perf_counter()
        inputs, targets = self._local_batch()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        local_loss = self.runner.run(inputs, targets)
        params = self.parameters()
        reduce_partial_grads(params)
        grad_norm = clip_grad_norm_(params, self.cfg.train.grad_clip, stage_replicas=self.dp * self.tp)
        for hook in self.after_backward_hooks:
            hook(self)
        lr = self.lr_scheduler.apply(self.optimizers, self.step)
        loss = self._global_loss(local_loss)
        grad_norm_value = grad_norm.item()
        if self.guard.check(self.step + 1, loss, grad_norm_value):  # a skipped step leaves weights and Adam state
            for opt in self.optimizers:
                opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.step += 1
        return step_record(
            step=self.step,
            loss=loss,
            lr=lr,
            grad_norm=grad_norm_value,
            tokens_per_step=self.tokens_per_step,
            step_time_s=time.perf_counter() - start,
            flops_per_step=self.flops_per_step,
            world_size=self.mesh.size(),
            peak=self.peak_tflops,
            mem_peak_gib=peak_memory_gib(self.device),
            skipped_steps=self.guard.skipped_steps,
        )

    # -- evaluation ---------------------------------------------------------------------------------------------
    def eval_due(self) -> bool:
        every = self.cfg.train.eval_every
        return bool(every) and (self.step % every == 0 or self.step == self.cfg.train.steps)

    def evaluate(self) -> float:
        """Mean loss over the first ``train.eval_batches`` global batches of the validation split (the same batches
        every time, so values are comparable along the run), forward only; the same on every rank."""
        losses = []
        for index in range(self.cfg.train.eval_batches):
            inputs, targets = self._local_batch(self.val_loader, index)
            losses.append(self._global_loss(forward_loss(self.runner, inputs, targets, self.n_microbatches)))
        return sum(losses) / len(losses)

    # -- the loop -----------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.console:
            self.console.info(
                f"hpcmega: {cfg.model.n_layers} layers d={cfg.model.d_model} | pp={self.pp} dp={self.dp} "
                f"tp={self.tp} | schedule={cfg.parallel.schedule if self.pp > 1 else 'none'} "
                f"microbatches={self.n_microbatches} recompute={cfg.parallel.recompute} {cfg.train.precision}"
            )
        history: dict[str, list] = {"steps": [], "losses": [], "grad_norms": [], "lrs": [], "step_times": []}
        progress = Progress(cfg.train.steps)  # elapsed and ETA on every step record
        while self.step < cfg.train.steps and not self._stop:
            record = self.train_step()
            if self.eval_due():
                record["val_loss"] = self.evaluate()
            for key, field in (
                ("steps", "step"),
                ("losses", "loss"),
                ("grad_norms", "grad_norm"),
                ("lrs", "lr"),
                ("step_times", "step_time_s"),
            ):
                history[key].append(record[field])
            progress.stamp(record)
            if self.metrics:
                self.metrics.write(record)
            if self.console and (record["step"] % max(1, cfg.logging.log_every) == 0 or self.step == cfg.train.steps
                                 or "val_loss" in record):
                self.console.step(record)
            for hook in self.step_end_hooks:
                hook(self, record)
        if self.metrics:
            self.metrics.close()
        return {**history, "final_step": self.step, "stopped_early": self.step < cfg.train.steps}


def resume(cfg: Config, ckpt, app_state: dict[str, Any], say: Callable[[str], None]):
    """Load what ``checkpoint.resume`` names (collective) and fix this attempt's lineage; returns the
    CheckpointInfo loaded, or None for a fresh start. Damaged newest checkpoints are skipped by ``auto``."""
    from hpcmega.checkpoint.locate import resume_target
    from hpcmega.checkpoint.rules import check_model_matches, check_trusted

    def check(info) -> None:
        check_model_matches(info.meta, cfg, info.url)

    target, resumed = resume_target(cfg.checkpoint.resume), None
    if target == "auto":
        resumed = ckpt.resume_auto(app_state, say, check)
    elif target != "none":
        check_trusted(target, ckpt.url, cfg.checkpoint.trust)
        ckpt.load(target, app_state, check)
        resumed = ckpt.info(target)
    if resumed:
        say(f"resumed from {resumed.url} at step {resumed.step} (written with {resumed.meta.get('layout')})")
    elif cfg.checkpoint.init_from:
        init_from(cfg, ckpt, app_state, check, say)
    message = ckpt.begin(resumed, attempt=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0))
    if message:
        say(message)
    return resumed


def init_from(cfg: Config, ckpt, app_state: dict[str, Any], check: Callable, say: Callable[[str], None]) -> None:
    """Load only the model weights of ``checkpoint.init_from`` (its newest intact save, or the step folder given),
    under the trust rule of ``--resume``; step, optimizer and data position stay fresh (collective)."""
    from hpcmega.checkpoint.locate import find_checkpoint, resume_target
    from hpcmega.checkpoint.rules import check_trusted

    info = find_checkpoint(resume_target(cfg.checkpoint.init_from), trust=True)  # reads JSON only
    check_trusted(info.url, ckpt.url, cfg.checkpoint.trust, named="--init-from")
    ckpt.load(info.url, app_state, check, weights_only=True)
    say(f"initialised from {info.url} (model weights of step {info.step}; optimizer and data from scratch)")


class CheckpointedRun:
    """This rank's checkpoint duties around :meth:`Trainer.fit`, as methods: resume at the start, save every
    ``save_every`` steps, at an agreed stop (preemption, time limit) and at the end."""

    def __init__(self, trainer: Trainer, run_dir: str, stop_flag=None, on_step=None) -> None:
        from hpcmega.checkpoint.store import CheckpointManager, ModelOptimizerState, TrainState, checkpoint_group

        cfg = trainer.cfg
        self.trainer, self.run_dir, self.stop_flag, self.on_step = trainer, run_dir, stop_flag, on_step
        self.manager = CheckpointManager(files.RunFolder(run_dir).checkpoint_url(cfg), keep=cfg.checkpoint.keep,
                                         checksums=cfg.checkpoint.verify_checksums,
                                         process_group=checkpoint_group(cfg.checkpoint.timeout_s))
        self.app_state = {"model": ModelOptimizerState(trainer.model_parts, trainer.optimizers),
                          "train": TrainState(trainer)}
        self.layout = {"pp": trainer.pp, "dp": trainer.dp, "tp": trainer.tp, "world_size": trainer.mesh.size()}
        self.last_saved = -1
        self.preempted = False

    def say(self, message: str) -> None:
        if self.trainer.console:
            self.trainer.console.info(message)

    def resume(self) -> None:
        """Load what ``checkpoint.resume`` names (collective); a save at the step resumed from is a no-op."""
        resumed = resume(self.trainer.cfg, self.manager, self.app_state, self.say)
        if resumed:  # the guard's counts are the same on every rank: rank 0's meta.json carries them
            self.trainer.guard.load_state_dict(resumed.meta.get("step_guard", {}))
            self.last_saved = self.trainer.step

    def save(self) -> None:
        t = self.trainer
        if self.last_saved == t.step:
            return
        meta = {"layout": self.layout, "wandb_run_id": files.RunFolder(self.run_dir).wandb_id(),
                "config": t.cfg.to_dict(), "step_guard": t.guard.state_dict()}
        info = self.manager.save(t.step, self.app_state, meta)
        self.last_saved = t.step
        self.say(f"checkpoint step {t.step} -> {info.url}")

    def stop_agreed(self) -> bool:
        return self.stop_flag is not None and self.stop_flag.agreed()

    def at_step_end(self, t: Trainer, record: dict[str, Any]) -> None:
        """The Trainer's step-end hook: report the step, save when due, save and stop when a stop is agreed."""
        if self.on_step is not None:
            self.on_step(record)
        every = t.cfg.checkpoint.save_every
        if every and t.step % every == 0:
            self.save()
        if self.stop_agreed():
            self.save()
            self.preempted = True
            t.request_stop()


def train(cfg: Config, mesh: DeviceMesh, run_dir: str, stop_flag=None, on_step=None) -> dict[str, Any]:
    """Run the configured training on this rank; returns per-step history (``losses``, ``grad_norms``, ...).

    Resumes from the latest checkpoint (``checkpoint.resume=auto``) or a given one (a URL, possibly written with
    another layout), saves every ``save_every`` steps and at the end, and -- when ``stop_flag``
    (hpcmega.training.preemption.StopFlag) fires on any rank -- saves at the next step boundary on all ranks and stops.
    ``on_step(record)`` is called after every step on this rank (the job passes rank 0's W&B logger).
    """
    trainer = Trainer(cfg, mesh, run_dir)
    run = CheckpointedRun(trainer, run_dir, stop_flag, on_step)
    run.resume()
    trainer.step_end_hooks.append(run.at_step_end)
    if trainer.step < cfg.train.steps and run.stop_agreed():  # signalled while loading: stop before doing anything
        return {"final_step": trainer.step, "stopped_early": True, "preempted": True, "losses": []}
    result = trainer.fit()
    run.save()  # a finished (or stopped) run always leaves a resumable checkpoint
    return {**result, "preempted": run.preempted, "checkpoint": run.manager.url}
