"""Sharing: the one loading path, model cards, serving flags (vLLM / llama.cpp), Hub upload, exports, GGUF import.

Nothing here is imported by ``import pi_peft`` or ``import peft``: only by the commands and functions that share."""
