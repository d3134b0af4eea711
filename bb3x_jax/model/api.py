"""The public model object: ``bb3x_jax.load(path)`` and what it returns.

Id conventions: ids are the checkpoint's own (ParlAI: 0 pad, 1 __start__,
2 __end__, 3 __unk__; OPT: 1 pad, 2 </s>). ``context_ids`` and
``label_ids`` are right-padded with the pad id; a label normally ends with the
end token. ``logits`` is teacher-forced: entry [b, t] scores ``label_ids[b, t]``
given the context and ``label_ids[b, :t]``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from bb3x_jax import decoding
from bb3x_jax.data import framing as framing_lib
from bb3x_jax.data.framing import Framing
from bb3x_jax.data.tokenizers import files as tokenizer_files
from bb3x_jax.model.config import ModelConfig
from bb3x_jax.model.formats import hf, metaseq, parlai, pickles
from bb3x_jax.model.formats import orbax as orbax_io
from bb3x_jax.model.transformer import Transformer


@dataclasses.dataclass
class BB3Model:
    """A network, its config, and (where the checkpoint has one) its tokenizer.

    ``tokenizer_spec`` names the tokenizer's files (``bb3x_jax.data.tokenizers.files``);
    ``tokenizer`` loads it on first use and ``framing()`` frames text as the
    checkpoint's own agent (or this project's training run) did.
    """

    network: Transformer
    config: ModelConfig
    source: str = ""
    tokenizer_spec: tokenizer_files.TokenizerSpec | None = None
    tokenizer_problem: str = ""  # why there is no tokenizer_spec, when one was looked for
    _tokenizer: object = dataclasses.field(default=None, repr=False)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.tokenizer_spec is None:
                raise tokenizer_files.TokenizerFileError(
                    self.tokenizer_problem or f"{self.source}: this checkpoint carries no tokenizer")
            self._tokenizer = tokenizer_files.load(self.tokenizer_spec)
        return self._tokenizer

    def framing(self, text_truncate: int | None = None, label_truncate: int | None = None) -> Framing:
        """How this model's inputs are framed; truncation defaults to what it was trained with
        (a run's record, the ParlAI options), else what its positions allow."""
        default_text, default_label = default_truncation(self.tokenizer_spec, self.config)
        return framing_lib.for_tokenizer(self.tokenizer_spec, text_truncate or default_text,
                                         label_truncate or default_label)

    def logits(self, context_ids, label_ids) -> jax.Array:
        """float32 [batch, label_len, vocab] next-token logits with teacher forcing
        (see ``Transformer.label_logits`` for the framing), in one compiled program per shape."""
        graphdef, state = nnx.split(self.network)
        return compiled_label_logits(graphdef)(state, jnp.asarray(context_ids), jnp.asarray(label_ids))

    def generate(self, context_ids, *, method: str = "greedy", max_len: int = 32, min_len: int = 0,
                 beam_size: int = 1, block_ngram: int = 0, context_block_ngram: int = 0, top_k: int = 0,
                 top_p: float = 1.0, temperature: float = 1.0, length_penalty: float = 1.0,
                 seed: int = 0) -> np.ndarray:
        """Generated token ids [batch, <= max_len]: no context, no start token, padded
        with the pad id after the end token. ``context_ids`` [batch, S] are right-padded.
        See ``bb3x_jax.decoding`` for the methods (``decoding.BB3_BEAM`` holds BB3's). An id
        outside ``[0, config.vocab_size)`` raises ValueError."""
        context_ids = np.asarray(context_ids)
        decoding.check_ids(context_ids, self.config.vocab_size, "context_ids")
        settings = decoding.Settings(method=method, max_len=max_len, min_len=min_len, beam_size=beam_size,
                                     block_ngram=block_ngram, context_block_ngram=context_block_ngram,
                                     top_k=top_k, top_p=top_p, temperature=temperature,
                                     length_penalty=length_penalty)
        return decoding.generate(self.network, context_ids, settings, seed=seed)

    def save_orbax(self, path: str, *, step: int = 0) -> str:
        """This project's checkpoint layout (parameters + config), e.g. for ``train.init_from``;
        the tokenizer's files go to ``path/tokenizer``."""
        folder = orbax_io.save_orbax(self.network, self.config, path, step=step)
        if self.tokenizer_spec is not None:
            tokenizer_files.save_bundle(self.tokenizer_spec, os.path.join(path, tokenizer_files.BUNDLE_DIR),
                                        framing=self.tokenizer_spec.framing)
        return folder

    def save_pytorch(self, path: str, format: str = "hf") -> list[str]:
        """A transformers directory (``format="hf"``; an OPT model's tokenizer files with it) or a
        ParlAI checkpoint (``"parlai"``: ``path``, ``path.opt``, ``path.dict``; needs the ParlAI
        dictionary the model came with). Returns the paths written."""
        if format == "hf":
            hf.save_hf(self.network, self.config, path)
            spec = self.tokenizer_spec
            if spec is not None and spec.kind in ("hf", "metaseq") and self.config.arch == "decoder_only":
                self.tokenizer.save_hf_files(path)
            elif spec is not None:
                logging.warning("save_pytorch: the %s tokenizer has no transformers form; %s holds the weights only",
                                spec.kind, path)
            return [path]
        if format == "parlai":
            spec = self.tokenizer_spec
            if spec is None or spec.kind != "parlai":
                kind = "no tokenizer" if spec is None else f"a {spec.kind} tokenizer"
                raise ValueError(f"{self.source}: a ParlAI checkpoint needs the ParlAI dictionary the model was "
                                 f"trained with; this model has {kind} (export it with format='hf')")
            truncation = None
            if spec.framing.get("text_truncate") and spec.framing.get("label_truncate"):
                truncation = (spec.framing["text_truncate"], spec.framing["label_truncate"])
            bpe_files = None
            if spec.options.get("dict_tokenizer") == "gpt2":
                bpe_files = (spec.files["vocab"], spec.files["merges"])
            return parlai.save_parlai(self.network, self.config, path, dict_file=spec.files["dict"],
                                      base_opt=spec.opt, truncation=truncation, bpe_files=bpe_files)
        raise ValueError(f"unknown format {format!r}; expected 'hf' or 'parlai'")


@functools.lru_cache(maxsize=32)
def compiled_label_logits(graphdef):
    """``label_logits`` jitted for one model structure: (state, context_ids, label_ids) -> logits.
    Called outside ``jit``, the network runs (and first compiles) operation by operation: a tiny
    model's forward is then about two hundred programs."""

    def label_logits(state, context_ids, label_ids):
        return nnx.merge(graphdef, state).label_logits(context_ids, label_ids)

    return jax.jit(label_logits)


def default_truncation(spec, cfg: ModelConfig) -> tuple[int, int]:
    """(text, label) truncation a checkpoint was trained with (``tokenizer_files.recorded_truncation``),
    else what the model's positions allow (decoder-only: shared by prompt and response)."""
    text, label = tokenizer_files.recorded_truncation(spec)
    if cfg.arch == "decoder_only":
        label = min(label or 128, cfg.n_positions // 4)
        return min(text or cfg.n_positions - label, cfg.n_positions - label), label
    return min(text or cfg.n_positions, cfg.n_positions), min(label or 128, cfg.n_positions)


def load(path: str, *, bpe_dir: str = "", trust_pickle: bool = False) -> BB3Model:
    """A model from a transformers directory (Blenderbot, OPT), a ParlAI checkpoint
    (the model file, with ``.opt`` and ``.dict`` beside it), or a metaseq (OPT)
    checkpoint: a consolidated file, one of its model-parallel parts / FSDP
    shards (the siblings are found and merged), or the folder holding them (see
    ``bb3x_jax.model.formats.metaseq``). A metaseq model exports with
    ``save_pytorch(format="hf")`` like any OPT model.

    Also the project's own orbax checkpoints: a step folder
    (``WORKDIR/checkpoints/300``), a folder of steps (the newest is read) or a
    training workdir; only the parameters are read, never the optimizer state.

    The tokenizer is found where each format keeps it (``bpe_dir``: where
    GPT-2's BPE files are when not beside the checkpoint). A ParlAI checkpoint
    without its ``.opt``, ``.dict`` or BPE files fails naming the file; other
    formats report a missing tokenizer when ``tokenizer`` is used.

    Pickled files (ParlAI, metaseq, transformers ``.bin``) are read by the safe
    unpickler (``bb3x_jax.model.formats.pickles``): a file that would need anything
    besides tensors and plain values is refused unless ``trust_pickle``.
    """
    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "config.json")):
            network, cfg = hf.load_hf(path, trust_pickle=trust_pickle)
            return _with_tokenizer(BB3Model(network, cfg, source=path), "hf", path, bpe_dir)

        if os.path.isdir(os.path.join(path, "checkpoints")):  # a training run's workdir
            path = os.path.join(path, "checkpoints")
        if orbax_io.is_orbax_path(path):
            network, cfg, step = orbax_io.load_orbax(path)
            model = BB3Model(network, cfg, source=f"{path} (step {step})")
            bundle = tokenizer_files.find_bundle(path)
            if bundle is None:
                model.tokenizer_problem = f"{path}: no {tokenizer_files.BUNDLE_DIR}/{tokenizer_files.BUNDLE_FILE} " \
                                          "beside the checkpoint (written by training runs and save_orbax)"
                return model
            model.tokenizer_spec = tokenizer_files.read_bundle(bundle)
            return model

        if metaseq.is_metaseq_dir(path, trust_pickle=trust_pickle):
            return _load_metaseq(path, bpe_dir, trust_pickle)
        raise FileNotFoundError(f"{path}: a folder without config.json (not a transformers directory)")
    if not os.path.isfile(path):
        raise FileNotFoundError(path)

    if metaseq.is_metaseq_file(path, trust_pickle=trust_pickle):  # a memory-mapped peek; read layer by layer
        return _load_metaseq(path, bpe_dir, trust_pickle)
    checkpoint = pickles.load(path, trust_pickle=trust_pickle)  # memory-mapped: only a peek at the keys
    if isinstance(checkpoint, dict) and ("cfg" in checkpoint or "args" in checkpoint):
        del checkpoint  # a metaseq file torch cannot memory-map (legacy format): the loader reads it again
        return _load_metaseq(path, bpe_dir, trust_pickle)
    if isinstance(checkpoint, dict) and "model" in checkpoint:  # ParlAI's weights file
        del checkpoint  # the loader maps the file again; never hold two copies

        network, cfg, report = parlai.load_parlai(path, trust_pickle=trust_pickle)
        if report.ignored_keys:
            logging.warning("bb3x_jax.load: %d key(s) outside the generator ignored: %s",
                            len(report.ignored_keys), json.dumps(report.ignored_keys[:10]))
        model = BB3Model(network, cfg, source=path)
        if report.opt_file:  # ParlAI's own layout: the dictionary and BPE files must be there too
            model.tokenizer_spec = tokenizer_files.resolve_parlai(path, bpe_dir=bpe_dir, opt=report.opt)
        elif os.path.isfile(path + ".dict"):
            return _with_tokenizer(model, "parlai", path, bpe_dir)
        else:
            model.tokenizer_problem = f"{path}: no {os.path.basename(path)}.dict beside it"
        return model
    raise ValueError(f"{path}: not a ParlAI checkpoint (a dict with 'model', and {os.path.basename(path)}.opt "
                     "beside it)")


def _with_tokenizer(model: BB3Model, kind: str, path: str, bpe_dir: str) -> BB3Model:
    """The model with its tokenizer's files, or the reason they are missing (reported on use)."""
    try:
        model.tokenizer_spec = tokenizer_files.resolve(kind, path, bpe_dir=bpe_dir)
    except tokenizer_files.TokenizerFileError as error:
        model.tokenizer_problem = str(error)
    return model


def _load_metaseq(path: str, bpe_dir: str = "", trust_pickle: bool = False) -> BB3Model:
    network, cfg, report = metaseq.load_metaseq(path, trust_pickle=trust_pickle)
    logging.info("bb3x_jax.load: %s", metaseq.summary(report))
    for warning in report.warnings:
        logging.warning("bb3x_jax.load: %s", warning)
    return _with_tokenizer(BB3Model(network, cfg, source=path), "metaseq", path, bpe_dir)


def count_mismatch(a: BB3Model, b: BB3Model) -> int:
    """Number of parameters that differ between two models (0 = bit-exact)."""
    differ = 0
    for (_, x), (_, y) in zip(nnx.iter_graph(a.network), nnx.iter_graph(b.network)):
        if isinstance(x, nnx.Param) and not np.array_equal(np.asarray(x[...]), np.asarray(y[...])):
            differ += 1
    return differ
