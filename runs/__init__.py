"""Datasets, tokenizers, training runs, metrics, checkpoints, evals and reports."""
