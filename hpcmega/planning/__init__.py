"""Planning: what a layout costs before it is queued -- memory per GPU, FLOPs, bubble, traffic, step time -- and
which layout to pick, and the checks that refuse a layout. Pure Python (no torch), so `hpcmega plan` answers in
milliseconds on a login node:

  layout.py          the placement of ranks on nodes -> (pp, dp, tp) coordinates and groups (one owner of that
                     sequence: layout_of)
  validate.py        validate(cfg) -> warnings; ConfigError("...; fix") for what cannot run
  stages.py          which layers each pipeline stage holds and which stages each pipeline rank owns
  flops.py           model FLOPs per step (the estimate and the training loop's MFU both use it)
  schedule_facts.py  activations in flight and bubble per pipeline schedule
  estimate.py        the estimator (per pipeline rank: params, grads, optimizer, activations, buffers, peak)
  search.py          `plan --auto`: every layout that fits, ranked by estimated step time
  check.py           the fit check `plan`/`submit` run, and the flag that would make a layout fit

The tables it reads sit one floor down, at the package root: hpcmega.schedules (pipeline-schedule facts) and
hpcmega.gpus (the GPU table). The real-engine measurement (`plan --measure`, imports torch) is
hpcmega.bench.measure.
"""
