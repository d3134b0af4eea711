"""bb3x-jax: BlenderBot 3x's recipe (learning from deployment feedback with CRINGE) in JAX."""


def load(path, **kwargs):
    """A model (and its tokenizer) from a ParlAI, transformers, metaseq or orbax checkpoint
    (see ``bb3x_jax.model.api.load``)."""
    from bb3x_jax.model.api import load as _load  # deferred: importing any bb3x_jax module stays light

    return _load(path, **kwargs)
