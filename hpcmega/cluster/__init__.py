"""Cluster side: how a run reaches its machines -- the checks made before anything is queued (preflight, the
values that may reach an sbatch script), SLURM (submitit executor, sbatch preview, job state), the local launcher
and its process plumbing, and the job environment each rank reads (distenv). The rank entry point itself sits above
(hpcmega.training.job); the commands hand it in."""
