"""Training and evaluation programs run by torchrun; no Django imports.

They read and write explicit paths and talk to the web app only through the event file
(`<run-dir>/events.jsonl`).
"""
