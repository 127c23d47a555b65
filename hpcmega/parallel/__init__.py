"""The parallel engine: split a model into pipeline stages, shard it (TP/SP, FSDP2), recompute, and run a step.

Order of application (each step needs the previous one's result; other orders fail or are silently wrong):
stage split -> tensor/sequence parallel -> activation recompute -> torch.compile -> FSDP2 -> PipelineStage -> schedule.
The model-specific part (a family's tensor-parallel plan) lives with the model, in hpcmega.models.<family>.
"""
