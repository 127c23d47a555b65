"""Training: what runs inside every rank of a job -- the entry point (``python -m hpcmega.training.job``), the
training loop, optimizer, metrics, W&B, preemption. Checkpoints are hpcmega.checkpoint; the rank's environment is
hpcmega.cluster.distenv."""
