"""Using a trained checkpoint on one process: find it, load it whatever layout wrote it, sample, export.

Training checkpoints are DCP shards written by many ranks in some (pp, dp, tp) layout. Everything here reads them
into the plain single-process :class:`hpcmega.models.gpt2.model.GPT` -- DCP reshards on load because parameter names are
the full model's in every layout -- so sampling and export never depend on how the run was parallelized.
"""
