"""Guards that keep a run from being injected, lost or left hanging: what may reach the sbatch script, checks made
before anything is queued or written, the run-folder lock. Pure Python unless a module says otherwise."""
