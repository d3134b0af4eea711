"""The BB3 model family in Flax NNX (encoder-decoder and OPT decoder-only).

Empty until the model issue lands: the network, its presets and the PyTorch
conversion live here. Nothing imports this package yet.
"""
