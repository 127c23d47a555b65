"""Llama family (Llama 2/3, Mistral, Qwen2-style): the model (``model``), its tensor-parallel plan (``parallelize``)."""
