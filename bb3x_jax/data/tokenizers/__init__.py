"""Tokenizers: the shared interface and this project's sentencepiece model
(``base``), GPT-2's byte-level BPE as BB3 uses it (``bpe``), and which files
belong to a checkpoint (``files``)."""
