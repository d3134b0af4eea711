"""The deployment data: the release's files, its streams and feedback, the TFDS
builder, tokenizers, framing and the batch iterator (``python -m bb3x_jax.data``
inspects a release)."""
