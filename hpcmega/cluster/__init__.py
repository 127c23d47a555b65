"""Cluster side: what talks to SLURM (submitit executor, sbatch preview, job state) and the local launcher that
starts the same per-rank entry point on one machine."""
