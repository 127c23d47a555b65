"""GPT-2: the model (``model``), its tensor-parallel plan (``parallelize``), its Hugging Face adapter
(``state_dict_adapter``)."""
