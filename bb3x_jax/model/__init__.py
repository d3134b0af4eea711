"""The BB3 model family in Flax NNX (encoder-decoder and OPT decoder-only): the
network, its presets, sharded construction, the feedback classifier, and
checkpoint formats (``formats``) behind ``bb3x_jax.load``."""
