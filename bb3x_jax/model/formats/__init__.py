"""Checkpoint formats in and out: transformers (``hf``), ParlAI (``parlai``),
metaseq (``metaseq``), this project's orbax folders (``orbax``), the name tables
they share (``tables``) and pickle reading that runs no code (``pickles``)."""
