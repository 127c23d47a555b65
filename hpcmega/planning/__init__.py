"""Planning: what a layout costs before it is queued -- memory per GPU, FLOPs, bubble, traffic, step time -- and
which layout to pick, and the checks that refuse a layout. Pure Python (no torch), so `hpcmega plan` answers in milliseconds on a login node:

  layout.py          the placement of ranks on nodes -> (pp, dp, tp) coordinates and groups (one owner of that
                     sequence: layout_of)
  validate.py        validate(cfg) -> warnings; ConfigError("...; fix") for what cannot run
  schedules.py       the one table of pipeline-schedule facts (stages per rank, V shape, split backward, ...)
  gpus.py            the GPU table (memory, bf16 peak, link bandwidth)
  schedule_facts.py  activations in flight and bubble per pipeline schedule
  estimate.py        the estimator (per pipeline rank: params, grads, optimizer, activations, buffers, peak)
  check.py           the fit check `plan`/`submit` run, and the flag that would make a layout fit
  search.py          `plan --auto`: every layout that fits, ranked by estimated step time
  measure.py         `plan --measure` (imports torch): the real engine on a fake process group, for comparison
"""
