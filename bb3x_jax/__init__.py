"""bb3x-jax: BlenderBot 3x's recipe (learning from deployment feedback with CRINGE) in JAX."""


def load(path):
    """A model from a transformers directory or a ParlAI checkpoint (see ``bb3x_jax.model.api``)."""
    from bb3x_jax.model.api import load as _load

    return _load(path)
