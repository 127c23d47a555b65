"""`hpcmega bench`: step time of fixed parallel layouts on this machine as ratios to single-process runs measured
in the same invocation, next to hand-written references (explicit TP, plain DDP); ``--comm`` measures bytes per
step per mesh dimension against the planner; ``--gpu`` times one GPU.

- :mod:`hpcmega.bench.cases` -- what is measured and the goals (pure);
- :mod:`hpcmega.bench.runner` -- interleaved repeats, min/median/max, ratios, the comm comparison;
- :mod:`hpcmega.bench.references` / :mod:`hpcmega.bench.explicit_tp` -- the references, without hpcmega's engine;
- :mod:`hpcmega.bench.gpu` -- one-GPU throughput, MFU and peak memory.
"""
