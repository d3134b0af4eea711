"""Which tokenizer belongs to a checkpoint, where its files are, and a portable copy of them.

Why this module exists: a pretrained checkpoint is only usable with the
tokenizer it was trained with, and each format keeps that tokenizer somewhere
else. ``resolve(kind, path)`` finds the files the way each format's own
loader does and fails naming the missing file and every place it looked;
``load(spec)`` builds the tokenizer; ``save_bundle`` / ``read_bundle`` keep a
copy of the files (and the framing a run used) beside a trained model, so that
the model can be chatted with, asked for text, or exported back to its format
with its dictionary unchanged.

Kinds and where their files are looked up:

* ``sentencepiece``: ``path`` is a ``.model`` file (this project's own).
* ``parlai``: ``path`` is a ParlAI model file; ``path.opt`` (JSON options) and
  ``path.dict`` (the dictionary, the authority for ids) sit beside it. A
  ``gpt2`` dictionary also needs GPT-2's ``encoder.json`` and ``vocab.bpe``:
  first in the checkpoint's folder, then ``bpe_dir``, then
  ``<opt datapath>/gpt2`` (where ParlAI looks). A ``bytelevelbpe`` dictionary
  needs ``path.dict-vocab.json`` / ``-merges.txt`` (or the opt's
  ``bpe_vocab`` / ``bpe_merge``, or ``vocab.json`` / ``merges.txt`` in
  ``bpe_dir``).
* ``hf``: ``path`` is a transformers OPT directory with ``vocab.json`` and
  ``merges.txt`` (OPT ids already), or the ``tokenizer.json`` that
  transformers 5 saves instead.
* ``metaseq``: ``path`` is a metaseq checkpoint file or folder; fairseq's
  ``dict.txt`` and GPT-2's vocabulary and merges (``gpt2-vocab.json`` /
  ``gpt2-merges.txt``, ``vocab.json`` / ``merges.txt`` or ``encoder.json`` /
  ``vocab.bpe``) in its folder, then in ``bpe_dir``.
* ``checkpoint``: whatever ``path`` is (any of the above, a bundle, or a
  training workdir / orbax checkpoint of this project, whose bundle is used).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

from bb3x_jax.data.tokenizers import base as tokenizer_lib
from bb3x_jax.data.tokenizers import bpe
from bb3x_jax.errors import UserError

KINDS = ("sentencepiece", "checkpoint", "parlai", "hf", "metaseq")
CONFIG_KINDS = ("auto",) + KINDS  # data.tokenizer.kind
BUNDLE_FILE = "bb3x_tokenizer.json"
BUNDLE_FORMAT = "bb3x_jax.tokenizer/1"
BUNDLE_DIR = "tokenizer"  # a training workdir's bundle: <workdir>/tokenizer

_GPT2_NAMES = (("encoder.json", "vocab.bpe"),)
_METASEQ_BPE_NAMES = (("gpt2-vocab.json", "gpt2-merges.txt"), ("vocab.json", "merges.txt"),
                      ("encoder.json", "vocab.bpe"))


class TokenizerFileError(UserError, FileNotFoundError):
    """A tokenizer file is missing or unusable; the message names it and where it was looked for."""


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """A resolved tokenizer: its kind, its files by role, and the options that shape its ids.

    ``options`` for ``parlai``: ``dict_tokenizer``, ``fp16_pad``,
    ``special_tokens``, ``add_prefix_space``; ``opt`` holds the checkpoint's
    whole ParlAI options (framing and export read them).
    """

    kind: str
    files: dict[str, str]
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    opt: dict[str, Any] | None = None
    source: str = ""
    framing: dict[str, Any] = dataclasses.field(default_factory=dict)  # a bundle's recorded framing


def _first(candidates: list[tuple[str, ...]], what: str, source: str) -> tuple[str, ...]:
    """The first group of paths that all exist; else an error listing every place tried."""
    for group in candidates:
        if all(os.path.isfile(p) for p in group):
            return group
    tried = "; ".join(" + ".join(group) for group in candidates) or "(nowhere to look)"
    raise TokenizerFileError(f"{source}: {what} not found (looked for {tried})")


def parlai_opt_path(model_file: str) -> str:
    return model_file + ".opt"


def read_parlai_opt(model_file: str) -> dict[str, Any]:
    """The JSON options ParlAI's ``agent.save()`` writes beside a model file."""
    path = parlai_opt_path(model_file)
    if not os.path.isfile(path):
        raise TokenizerFileError(f"{path} is missing: a ParlAI checkpoint is three files (model, model.opt, "
                                 "model.dict), as agent.save() writes them")
    try:
        with open(path) as f:
            opt = json.load(f)
    except (OSError, ValueError) as error:
        raise TokenizerFileError(f"{path}: not a ParlAI options file ({error})") from None
    if not isinstance(opt, dict):
        raise TokenizerFileError(f"{path}: not a ParlAI options file (a JSON object)")
    return opt


def _parlai_special_tokens(opt: dict[str, Any]) -> list[str]:
    value = opt.get("special_tok_lst")
    if not value:
        return []
    return [t for t in (value.split(",") if isinstance(value, str) else list(value)) if t]


def resolve_parlai(model_file: str, *, bpe_dir: str = "", opt: dict[str, Any] | None = None) -> TokenizerSpec:
    model_file = os.path.abspath(model_file)
    opt = read_parlai_opt(model_file) if opt is None else opt
    dict_file = model_file + ".dict"
    if not os.path.isfile(dict_file):
        raise TokenizerFileError(f"{dict_file} is missing: a ParlAI checkpoint's dictionary is model.dict beside "
                                 "the model file")
    kind = opt.get("dict_tokenizer") or "re"
    folder = os.path.dirname(model_file)
    files = {"dict": dict_file}
    if kind == "gpt2":
        places = [folder] + ([os.path.expanduser(bpe_dir)] if bpe_dir else [])
        if opt.get("datapath"):
            places.append(os.path.join(os.path.expanduser(opt["datapath"]), "gpt2"))
        vocab, merges = _first([(os.path.join(p, "encoder.json"), os.path.join(p, "vocab.bpe")) for p in places],
                               "GPT-2 BPE files (encoder.json and vocab.bpe; set data.tokenizer.bpe_dir)",
                               model_file)
    elif kind == "bytelevelbpe":
        candidates = [(dict_file + "-vocab.json", dict_file + "-merges.txt")]
        if opt.get("bpe_vocab") and opt.get("bpe_merge"):
            candidates.append((os.path.expanduser(opt["bpe_vocab"]), os.path.expanduser(opt["bpe_merge"])))
        if bpe_dir:
            candidates.append((os.path.join(bpe_dir, "vocab.json"), os.path.join(bpe_dir, "merges.txt")))
        vocab, merges = _first(candidates, "byte-level BPE files (vocab and merges)", model_file)
    else:
        raise TokenizerFileError(f"{parlai_opt_path(model_file)}: dict_tokenizer {kind!r} is not supported "
                                 "(gpt2 and bytelevelbpe are: BB3 uses gpt2)")
    files.update(vocab=vocab, merges=merges)
    options = {
        "dict_tokenizer": kind,
        "fp16_pad": bool(opt.get("fp16") or opt.get("force_fp16_tokens")),
        "special_tokens": _parlai_special_tokens(opt),
        "add_prefix_space": opt.get("bpe_add_prefix_space"),
    }
    return TokenizerSpec("parlai", files, options, opt=opt, source=model_file)


def resolve_hf(directory: str) -> TokenizerSpec:
    directory = os.path.abspath(directory)
    config_path = os.path.join(directory, "config.json")
    try:
        with open(config_path) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError) as error:
        raise TokenizerFileError(f"{config_path}: not a transformers directory ({error})") from None
    if model_type != "opt":
        raise TokenizerFileError(f"{directory}: text tokenization is implemented for transformers OPT directories "
                                 f"(BB3-30B/175B), not model_type {model_type!r}")
    found = _first([(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")),
                    (os.path.join(directory, "tokenizer.json"),)],
                   "OPT tokenizer files (vocab.json and merges.txt, or tokenizer.json)", directory)
    files = {"vocab": found[0], "merges": found[1]} if len(found) == 2 else {"tokenizer.json": found[0]}
    files.update({name: os.path.join(directory, name) for name in ("tokenizer_config.json", "special_tokens_map.json")
                  if os.path.isfile(os.path.join(directory, name))})
    return TokenizerSpec("hf", files, source=directory)


def resolve_metaseq(path: str, *, bpe_dir: str = "") -> TokenizerSpec:
    path = os.path.abspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    places = [folder] + ([os.path.expanduser(bpe_dir)] if bpe_dir else [])
    (dict_txt,) = _first([(os.path.join(p, "dict.txt"),) for p in places], "fairseq dict.txt", path)
    vocab, merges = _first([(os.path.join(p, v), os.path.join(p, m)) for p in places for v, m in _METASEQ_BPE_NAMES],
                           "GPT-2 BPE files", path)
    return TokenizerSpec("metaseq", {"dict": dict_txt, "vocab": vocab, "merges": merges}, source=path)


def resolve_sentencepiece(path: str) -> TokenizerSpec:
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise TokenizerFileError(f"{path}: no sentencepiece model there")
    return TokenizerSpec("sentencepiece", {"model": path}, source=path)


def find_bundle(path: str) -> str | None:
    """The bundle folder of a model path of this project: the folder itself, ``<path>/tokenizer``,
    or that of the workdir a checkpoint step / checkpoints folder belongs to."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):  # a file is a checkpoint of another format, with its own tokenizer files
        return None
    candidates = [path, os.path.join(path, BUNDLE_DIR)]
    up = path
    for _ in range(2):  # <workdir>/checkpoints/<step> -> <workdir>
        up = os.path.dirname(up)
        candidates.append(os.path.join(up, BUNDLE_DIR))
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, BUNDLE_FILE)):
            return folder
    return None


def checkpoint_kind(path: str, *, trust_pickle: bool = False) -> str:
    """The tokenizer kind of a model path (``checkpoint`` resolution), or an error saying what it is not."""
    path = os.path.abspath(os.path.expanduser(path))
    if find_bundle(path) is not None:
        return "bundle"
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return "hf"
        from bb3x_jax.model.formats import metaseq  # imports JAX, which the data tools otherwise never load

        if metaseq.is_metaseq_dir(path, trust_pickle=trust_pickle):
            return "metaseq"
        raise TokenizerFileError(f"{path}: no tokenizer found (not a transformers directory, a metaseq folder, or "
                                 f"a model of this project with a {BUNDLE_DIR}/{BUNDLE_FILE})")
    if not os.path.isfile(path):
        raise TokenizerFileError(f"{path}: no such file or folder")
    if path.endswith(".model") and not os.path.isfile(parlai_opt_path(path)):
        return "sentencepiece"
    if os.path.isfile(parlai_opt_path(path)) or os.path.isfile(path + ".dict"):
        return "parlai"
    from bb3x_jax.model.formats import metaseq

    if metaseq.is_metaseq_file(path, trust_pickle=trust_pickle):
        return "metaseq"
    raise TokenizerFileError(f"{path}: cannot tell its tokenizer (a ParlAI model file has {os.path.basename(path)}"
                             ".opt and .dict beside it; a metaseq file a dict.txt)")


def resolve(kind: str, path: str, *, bpe_dir: str = "", trust_pickle: bool = False) -> TokenizerSpec:
    """The tokenizer of ``kind`` at ``path`` (see the module docstring), files checked."""
    if kind not in KINDS:
        raise ValueError(f"tokenizer kind {kind!r} is not one of {', '.join(KINDS)}")
    if not path:
        raise TokenizerFileError(f"a {kind} tokenizer needs a path")
    path = os.path.abspath(os.path.expanduser(path))
    if kind == "checkpoint":
        kind = checkpoint_kind(path, trust_pickle=trust_pickle)
        if kind == "bundle":
            return read_bundle(find_bundle(path))
    if kind == "sentencepiece":
        return resolve_sentencepiece(path)
    if kind == "parlai":
        return resolve_parlai(path, bpe_dir=bpe_dir)
    if kind == "hf":
        return resolve_hf(path)
    return resolve_metaseq(path, bpe_dir=bpe_dir)


def _is_project_checkpoint(path: str) -> bool:
    """An orbax checkpoint of this project: a step folder, a folder of steps, or a workdir."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        return False
    if os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isdir(os.path.join(path, "params")):
        return True
    return any(name.isdigit() and os.path.isdir(os.path.join(path, name, "params")) for name in os.listdir(path))


def effective_kind(kind: str, init_from: str) -> str:
    """``auto``: the tokenizer of the checkpoint training starts from (``checkpoint``), else a
    sentencepiece model trained on the data. A run of this project that kept no tokenizer
    bundle used the data's sentencepiece model, so it gets that one again."""
    if kind != "auto":
        return kind
    if not init_from:
        return "sentencepiece"
    if find_bundle(init_from) is None and _is_project_checkpoint(init_from):
        return "sentencepiece"
    return "checkpoint"


def resolve_configured(kind: str, path: str, *, init_from: str = "", bpe_dir: str = "",
                       trust_pickle: bool = False) -> TokenizerSpec | None:
    """The configured tokenizer (``data.tokenizer``), or None for a sentencepiece model that is
    to be trained on the data (kind ``sentencepiece`` without a path)."""
    kind = effective_kind(kind, init_from)
    if kind == "sentencepiece":
        return resolve_sentencepiece(path) if path else None
    if kind == "checkpoint":
        path = path or init_from
        if not path:
            raise TokenizerFileError("tokenizer kind 'checkpoint' needs data.tokenizer.path or train.init_from")
    return resolve(kind, path, bpe_dir=bpe_dir, trust_pickle=trust_pickle)


def recorded_truncation(spec: TokenizerSpec | None) -> tuple[int | None, int | None]:
    """(text, label) truncation the checkpoint records: a training run's (its bundle), a ParlAI
    checkpoint's options (``text_truncate`` / ``label_truncate``, else ``truncate``); None if none."""
    if spec is None:
        return None, None
    if spec.framing.get("text_truncate"):
        return int(spec.framing["text_truncate"]), int(spec.framing["label_truncate"])
    opt = spec.opt or {}

    def positive(*keys):
        for key in keys:
            if opt.get(key) is not None and int(opt[key]) > 0:
                return int(opt[key])
        return None

    return positive("text_truncate", "truncate"), positive("label_truncate", "truncate")


def load(spec: TokenizerSpec):
    """The tokenizer object for a resolved spec (files are read here)."""
    f = spec.files
    try:
        if spec.kind == "sentencepiece":
            return tokenizer_lib.SentencePieceTokenizer.load(f["model"])
        if spec.kind == "parlai":
            o = spec.options
            return bpe.ParlaiBpeTokenizer.from_parlai_files(
                f["dict"], dict_tokenizer=o["dict_tokenizer"], bpe_vocab=f["vocab"], bpe_merges=f["merges"],
                additional_special_tokens=o.get("special_tokens", ()), fp16_pad=o.get("fp16_pad", False),
                add_prefix_space=o.get("add_prefix_space") if o["dict_tokenizer"] == "bytelevelbpe" else None)
        if spec.kind == "hf" and "tokenizer.json" in f:
            return bpe.OptGpt2Tokenizer.from_hf_tokenizer_json(f["tokenizer.json"])
        if spec.kind == "hf":
            return bpe.OptGpt2Tokenizer.from_hf_files(f["vocab"], f["merges"])
        if spec.kind == "metaseq":
            return bpe.OptGpt2Tokenizer.from_metaseq_files(f["vocab"], f["merges"], f["dict"])
    except (OSError, ValueError, KeyError) as error:
        raise TokenizerFileError(f"{spec.source}: its tokenizer files do not load ({error})") from None
    raise ValueError(f"unknown tokenizer kind {spec.kind!r}")


def load_path(kind: str, path: str, *, bpe_dir: str = "", trust_pickle: bool = False):
    """``load(resolve(...))``: the tokenizer of a path."""
    return load(resolve(kind, path, bpe_dir=bpe_dir, trust_pickle=trust_pickle))


# --- bundles: a portable copy beside a trained model ------------------------------------

_BUNDLE_NAMES = {
    "sentencepiece": {"model": "sentencepiece.model"},
    "parlai": {"dict": "model.dict", "vocab": "encoder.json", "merges": "vocab.bpe"},
    "hf": {"vocab": "vocab.json", "merges": "merges.txt", "tokenizer.json": "tokenizer.json",
           "tokenizer_config.json": "tokenizer_config.json", "special_tokens_map.json": "special_tokens_map.json"},
    "metaseq": {"dict": "dict.txt", "vocab": "gpt2-vocab.json", "merges": "gpt2-merges.txt"},
}


def save_bundle(spec: TokenizerSpec, directory: str, *, framing: dict[str, Any] | None = None) -> str:
    """Copies the tokenizer's files into ``directory`` with a manifest (and the framing a run used).

    A ParlAI bytelevelbpe dictionary keeps its ``model.dict-vocab.json`` /
    ``-merges.txt`` names; a ParlAI checkpoint's options go to ``model.opt``.
    Writing the same bundle again is a no-op; a different one is refused.
    """
    names = dict(_BUNDLE_NAMES[spec.kind])
    if spec.kind == "parlai" and spec.options.get("dict_tokenizer") == "bytelevelbpe":
        names.update(vocab="model.dict-vocab.json", merges="model.dict-merges.txt")
    manifest = {
        "format": BUNDLE_FORMAT,
        "kind": spec.kind,
        "files": {role: names[role] for role in spec.files},
        "options": spec.options,
        "source": spec.source,
        "framing": framing or {},
    }
    if spec.opt is not None:
        manifest["opt_file"] = "model.opt"
    os.makedirs(directory, exist_ok=True)
    manifest_path = os.path.join(directory, BUNDLE_FILE)
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            existing = json.load(f)
        same = {k: v for k, v in existing.items() if k != "source"} == {k: v for k, v in manifest.items()
                                                                        if k != "source"}
        if same:
            return directory
        raise TokenizerFileError(f"{manifest_path} holds another tokenizer or framing; use a new directory")
    for role, source in spec.files.items():
        target = os.path.join(directory, names[role])
        if os.path.abspath(source) != os.path.abspath(target):
            shutil.copyfile(source, target)
    if spec.opt is not None:
        with open(os.path.join(directory, "model.opt"), "w") as f:
            json.dump(spec.opt, f, indent=4)
    tmp = manifest_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, manifest_path)  # the manifest last: a half-copied bundle is never read
    return directory


def read_bundle(directory: str) -> TokenizerSpec:
    """The spec (with its recorded framing) of a bundle written by ``save_bundle``; errors name the file."""
    manifest_path = os.path.join(directory, BUNDLE_FILE)
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {BUNDLE_FORMAT!r}")
        files = {role: os.path.join(directory, name) for role, name in manifest["files"].items()}
        opt = None
        if manifest.get("opt_file"):
            with open(os.path.join(directory, manifest["opt_file"])) as f:
                opt = json.load(f)
    except (OSError, ValueError, KeyError) as error:
        raise TokenizerFileError(f"{manifest_path}: not a readable tokenizer bundle ({error})") from None
    missing = [p for p in files.values() if not os.path.isfile(p)]
    if missing:
        raise TokenizerFileError(f"{manifest_path}: bundle files missing: {', '.join(missing)}")
    return TokenizerSpec(manifest["kind"], files, manifest.get("options", {}), opt=opt, source=directory,
                         framing=manifest.get("framing", {}))
