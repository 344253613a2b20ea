"""Inference: the GPT model, tokenizer, chat format, KV-cache engine and tools.

Nothing here imports Django, so training programs and engine workers can run on a GPU
node that has no database.
"""
