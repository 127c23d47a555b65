"""hpcmega: a 3D-parallel GPT training job, from a laptop to a multi-node SLURM cluster.

Importing the package is cheap on purpose: torch, wandb and submitit load only where they are used.
"""
__version__ = "0.1.0"
