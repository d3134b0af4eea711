"""The public model object: ``bb3x_jax.load(path)`` and what it returns.

Id conventions: ids are the checkpoint's own (ParlAI: 0 pad, 1 __start__,
2 __end__, 3 __unk__; OPT: 1 pad, 2 </s>). ``context_ids`` and
``label_ids`` are right-padded with the pad id; a label normally ends with the
end token. ``logits`` is teacher-forced: entry [b, t] scores ``label_ids[b, t]``
given the context and ``label_ids[b, :t]``.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from bb3x_jax.model.config import ModelConfig
from bb3x_jax.model.transformer import Transformer


@dataclasses.dataclass
class BB3Model:
    network: Transformer
    config: ModelConfig
    source: str = ""

    def logits(self, context_ids, label_ids) -> jax.Array:
        """float32 [batch, label_len, vocab] next-token logits with teacher forcing
        (see ``Transformer.label_logits`` for the framing)."""
        return self.network.label_logits(jnp.asarray(context_ids), jnp.asarray(label_ids))

    def generate(self, context_ids, *, method: str = "greedy", max_len: int = 32, min_len: int = 0,
                 beam_size: int = 1, block_ngram: int = 0, context_block_ngram: int = 0, top_k: int = 0,
                 top_p: float = 1.0, temperature: float = 1.0, length_penalty: float = 1.0,
                 seed: int = 0) -> np.ndarray:
        """Generated token ids [batch, <= max_len]: no context, no start token, padded
        with the pad id after the end token. ``context_ids`` [batch, S] are right-padded.
        See ``bb3x_jax.decoding`` for the methods (``decoding.BB3_BEAM`` holds BB3's)."""
        from bb3x_jax import decoding

        settings = decoding.Settings(method=method, max_len=max_len, min_len=min_len, beam_size=beam_size,
                                     block_ngram=block_ngram, context_block_ngram=context_block_ngram,
                                     top_k=top_k, top_p=top_p, temperature=temperature,
                                     length_penalty=length_penalty)
        return decoding.generate(self.network, np.asarray(context_ids), settings, seed=seed)

    def save_orbax(self, path: str, *, step: int = 0) -> str:
        """This project's checkpoint layout (parameters + config), e.g. for ``train.init_from``."""
        from bb3x_jax.model import orbax_io

        return orbax_io.save_orbax(self.network, self.config, path, step=step)

    def save_pytorch(self, path: str, format: str = "hf") -> None:
        """A transformers directory (``format="hf"``) or a ParlAI checkpoint file (``"parlai"``)."""
        if format == "hf":
            from bb3x_jax.model import hf

            hf.save_hf(self.network, self.config, path)
        elif format == "parlai":
            from bb3x_jax.model import parlai

            parlai.save_parlai(self.network, self.config, path)
        else:
            raise ValueError(f"unknown format {format!r}; expected 'hf' or 'parlai'")


def load(path: str) -> BB3Model:
    """A model from a transformers directory (Blenderbot, OPT), a ParlAI checkpoint
    file, or a metaseq (OPT) checkpoint: a consolidated file, one of its
    model-parallel parts / FSDP shards (the siblings are found and merged), or the
    folder holding them (see ``bb3x_jax.model.metaseq``). A metaseq model exports
    with ``save_pytorch(format="hf")`` like any OPT model.

    Also the project's own orbax checkpoints: a step folder
    (``WORKDIR/checkpoints/300``), a folder of steps (the newest is read) or a
    training workdir; only the parameters are read, never the optimizer state.
    """
    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "config.json")):
            from bb3x_jax.model import hf

            network, cfg = hf.load_hf(path)
            return BB3Model(network, cfg, source=path)
        from bb3x_jax.model import orbax_io

        if os.path.isdir(os.path.join(path, "checkpoints")):  # a training run's workdir
            path = os.path.join(path, "checkpoints")
        if orbax_io.is_orbax_path(path):
            network, cfg, step = orbax_io.load_orbax(path)
            return BB3Model(network, cfg, source=f"{path} (step {step})")
        from bb3x_jax.model import metaseq

        if metaseq.is_metaseq_dir(path):
            return _load_metaseq(path)
        raise FileNotFoundError(f"{path}: a folder without config.json (not a transformers directory)")
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    from bb3x_jax.model import metaseq

    if metaseq.is_metaseq_file(path):  # a memory-mapped peek: metaseq files are read lazily, layer by layer
        return _load_metaseq(path)
    from bb3x_jax.model import hf

    checkpoint = hf.torch_load(path, weights_only=False)  # memory-mapped: only a peek at the keys
    is_parlai = isinstance(checkpoint, dict) and "model" in checkpoint and "opt" in checkpoint
    if is_parlai:
        del checkpoint  # the loader maps the file again; never hold two copies
        from bb3x_jax.model import parlai

        network, cfg, report = parlai.load_parlai(path)
        if report.ignored_keys:
            logging.warning("bb3x_jax.load: %d key(s) outside the generator ignored: %s",
                            len(report.ignored_keys), json.dumps(report.ignored_keys[:10]))
        return BB3Model(network, cfg, source=path)
    if isinstance(checkpoint, dict) and ("cfg" in checkpoint or "args" in checkpoint):
        del checkpoint  # a metaseq file torch cannot memory-map (legacy format): the loader reads it again
        return _load_metaseq(path)
    raise ValueError(f"{path}: not a ParlAI checkpoint (a dict with 'model' and 'opt')")


def _load_metaseq(path: str) -> BB3Model:
    from bb3x_jax.model import metaseq

    network, cfg, report = metaseq.load_metaseq(path)
    logging.info("bb3x_jax.load: %s", metaseq.summary(report))
    for warning in report.warnings:
        logging.warning("bb3x_jax.load: %s", warning)
    return BB3Model(network, cfg, source=path)


def count_mismatch(a: BB3Model, b: BB3Model) -> int:
    """Number of parameters that differ between two models (0 = bit-exact)."""
    from flax import nnx

    differ = 0
    for (_, x), (_, y) in zip(nnx.iter_graph(a.network), nnx.iter_graph(b.network)):
        if isinstance(x, nnx.Param) and not np.array_equal(np.asarray(x[...]), np.asarray(y[...])):
            differ += 1
    return differ
