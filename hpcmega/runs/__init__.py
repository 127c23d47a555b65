"""Run folders: their file names and contents (files), the one-job-per-folder lock (lock), progress and ETA
(progress), sweep points (sweep). Pure Python at import time.

``files`` owns every file name inside a run folder; the job, the launcher, training and the W&B logger write
through it, the lifecycle commands read through it. The jobs of a run and their SLURM state are
hpcmega.cluster.jobs.
"""
