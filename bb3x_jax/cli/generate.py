"""Generate from any model ``bb3x_jax.load`` reads, from the command line.

    python -m bb3x_jax.cli.generate MODEL --input contexts.jsonl [--method beam --beam_size 10 ...]

``MODEL`` is a transformers directory, a ParlAI or metaseq checkpoint, or a
training workdir / orbax checkpoint of this project. Each input line is JSON
with ``context_ids`` (token ids), or ``context`` (text: the previous turns
joined with ``"\n"``, framed as the model was trained, e.g. BB3-3B's bart
framing or BB3-175B's prompt). Text needs a tokenizer: the model's own (a
ParlAI checkpoint's dictionary, an OPT checkpoint's BPE files, a training
run's copy), or ``--tokenizer`` (anything ``data.tokenizer.path`` takes).
Each output line (stdout, or ``--output``) repeats the input with
``response_ids`` and, with a tokenizer, ``response``. Lines are decoded in
batches of ``--batch`` rows. A malformed line (or an id outside the model's
vocabulary ``[0, vocab_size)``) stops the run before any decoding, with one
line naming the input and the line number, exit status 2; so does a missing or
unreadable model.
"""

from __future__ import annotations

import json
import pickle
import sys

from absl import app, flags

from bb3x_jax import decoding
from bb3x_jax.cli import convert
from bb3x_jax.data import framing as framing_lib
from bb3x_jax.data.tokenizers import files as tokenizer_files
from bb3x_jax.eval import generation as generation_eval
from bb3x_jax.model import api

_INPUT = flags.DEFINE_string("input", "-", "JSONL contexts ('-': stdin).")
_OUTPUT = flags.DEFINE_string("output", "-", "JSONL results ('-': stdout).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "Tokenizer for text ('': the model's own); a sentencepiece "
                                 "model, a ParlAI model file, a transformers or metaseq checkpoint.")
_TOKENIZER_KIND = flags.DEFINE_enum("tokenizer_kind", "checkpoint", tokenizer_files.KINDS,
                                    "What --tokenizer is (checkpoint: told from the path).")
_BPE_DIR = flags.DEFINE_string("bpe_dir", "", "Where GPT-2's BPE files are when not beside the checkpoint.")
_TRUST_PICKLE = flags.DEFINE_bool("trust_pickle", False, "Read MODEL's pickles with the full unpickler, which can run "
                                  "code from the file: only for files from a source you trust.")
_BATCH = flags.DEFINE_integer("batch", 16, "Contexts decoded together.")
_TEXT_TRUNCATE = flags.DEFINE_integer("text_truncate", 0, "Context tokens kept (0: what the model was trained "
                                      "with, else what its positions allow).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_SETTINGS = {
    field.name: flags.DEFINE_string(field.name, None, f"decoding.Settings.{field.name} (default {field.default})")
    for field in decoding.Settings.__dataclass_fields__.values()
}


def _settings() -> decoding.Settings:
    values = {}
    for name, flag in _SETTINGS.items():
        if flag.value is not None:
            kind = type(decoding.Settings.__dataclass_fields__[name].default)
            values[name] = kind(flag.value)
    return decoding.Settings(**values)


def _fail(message: str) -> None:
    """A user mistake: one line on stderr, exit status 2 (a traceback is left for bugs)."""
    print(f"generate: {message}", file=sys.stderr)
    sys.exit(2)


def _read(path: str, tokenizer, framing, vocab_size: int) -> tuple[list[dict], list[list[int]]]:
    try:
        stream = sys.stdin if path == "-" else open(path)
    except OSError as error:
        _fail(f"{path}: {error.strerror or error}")
    records, rows = [], []
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("expected a JSON object with context_ids or context")
            if "context_ids" in record:
                given = record["context_ids"]
                if not isinstance(given, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in given):
                    raise ValueError("context_ids must be a list of integers")
                ids = given
            elif "context" in record and tokenizer is not None:
                ids = framing_lib.frame_context_rows([record["context"]], tokenizer, framing).row(0)
            elif "context" in record:
                raise ValueError("a text context needs a tokenizer: the model carries none; pass --tokenizer")
            else:
                raise ValueError("needs context_ids or context")
            decoding.check_ids(ids, vocab_size, f"{path}:{number}")  # all of them, before truncation
        except (ValueError, TypeError) as error:
            message = str(error)
            _fail(message if message.startswith(f"{path}:{number}: ") else f"{path}:{number}: {message}")
        records.append(record)
        rows.append(ids[-framing.text_truncate:] if "context_ids" in record else ids)
    return records, rows


def _tokenizer_and_framing(model):
    """(tokenizer or None, framing) for text: --tokenizer, else the model's own."""
    text_truncate = _TEXT_TRUNCATE.value or None
    if _TOKENIZER.value:
        spec = tokenizer_files.resolve(_TOKENIZER_KIND.value, _TOKENIZER.value, bpe_dir=_BPE_DIR.value,
                                       trust_pickle=_TRUST_PICKLE.value)
        text, label = api.default_truncation(spec, model.config)
        return tokenizer_files.load(spec), framing_lib.for_tokenizer(spec, text_truncate or text, label)
    if model.tokenizer_spec is None:
        return None, model.framing(text_truncate)
    return model.tokenizer, model.framing(text_truncate)


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("usage: python -m bb3x_jax.cli.generate MODEL [flags]")
    if problem := convert.source_file_problem(argv[1]):
        _fail(problem)
    try:
        settings = _settings()
        model = api.load(argv[1], bpe_dir=_BPE_DIR.value, trust_pickle=_TRUST_PICKLE.value)
        tokenizer, framing = _tokenizer_and_framing(model)
    except (OSError, ValueError, pickle.UnpicklingError, EOFError) as error:  # a missing or unusable file, a bad flag
        message = str(error) or type(error).__name__
        _fail(message if argv[1] in message else f"{argv[1]}: {message}")
    records, rows = _read(_INPUT.value, tokenizer, framing, model.config.vocab_size)
    pad = model.config.pad_id
    out = sys.stdout if _OUTPUT.value == "-" else open(_OUTPUT.value, "w")
    width = max((len(r) for r in rows), default=1)
    for start in range(0, len(rows), _BATCH.value):
        chunk = rows[start : start + _BATCH.value]
        batch = decoding.pad_batch(chunk, rows=len(chunk), width=width, pad_id=pad)
        generated = decoding.generate(model.network, batch, settings, seed=_SEED.value)
        for record, ids in zip(records[start : start + _BATCH.value], generated):
            ids = [int(t) for t in ids]
            if model.config.end_id in ids:
                ids = ids[: ids.index(model.config.end_id) + 1]
            result = {**record, "response_ids": ids}
            if tokenizer is not None:
                result["response"] = generation_eval.response_text(tokenizer, ids)
            out.write(json.dumps(result) + "\n")
    out.flush()


if __name__ == "__main__":
    app.run(main)
