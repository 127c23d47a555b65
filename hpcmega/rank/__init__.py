"""Rank side: what runs inside every rank of a job -- its environment, the entry point (``python -m
hpcmega.rank.job``), the training loop, checkpoints, optimizer, metrics, W&B, preemption."""
