"""Generate from any model ``bb3x_jax.load`` reads, from the command line.

    python -m bb3x_jax.generate MODEL --input contexts.jsonl [--method beam --beam_size 10 ...]

``MODEL`` is a transformers directory, a ParlAI or metaseq checkpoint, or a
training workdir / orbax checkpoint of this project. Each input line is JSON
with ``context_ids`` (token ids), or ``context`` (text; needs ``--tokenizer``,
a sentencepiece model of this project, e.g. the one beside a run's prepared
data). Each output line (stdout, or ``--output``) repeats the input with
``response_ids`` and, with a tokenizer, ``response``. Lines are decoded in
batches of ``--batch`` rows; a malformed line stops the run naming its number.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from bb3x_jax import decoding
from bb3x_jax.data import pipeline
from bb3x_jax.train import generation_eval

_INPUT = flags.DEFINE_string("input", "-", "JSONL contexts ('-': stdin).")
_OUTPUT = flags.DEFINE_string("output", "-", "JSONL results ('-': stdout).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "sentencepiece model for text contexts and responses.")
_BATCH = flags.DEFINE_integer("batch", 16, "Contexts decoded together.")
_TEXT_TRUNCATE = flags.DEFINE_integer("text_truncate", 128, "Context tokens kept (the last ones).")
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


def _read(path: str, tokenizer, text_truncate: int) -> tuple[list[dict], list[list[int]]]:
    stream = sys.stdin if path == "-" else open(path)
    records, rows = [], []
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if "context_ids" in record:
                ids = [int(t) for t in record["context_ids"]]
            elif "context" in record and tokenizer is not None:
                ids = pipeline.context_ids([record["context"]], tokenizer, text_truncate)[0].tolist()
                ids = [t for t in ids if t != tokenizer.pad_id]
            else:
                raise ValueError("needs context_ids, or context with --tokenizer")
        except (ValueError, TypeError) as error:
            raise SystemExit(f"{path}:{number}: {error}") from None
        records.append(record)
        rows.append(ids[-text_truncate:])
    return records, rows


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("usage: python -m bb3x_jax.generate MODEL [flags]")
    import numpy as np

    from bb3x_jax.model import api

    settings = _settings()
    tokenizer = None
    if _TOKENIZER.value:
        from bb3x_jax.data import tokenizer as tokenizer_lib

        tokenizer = tokenizer_lib.SentencePieceTokenizer.load(_TOKENIZER.value)
    model = api.load(argv[1])
    records, rows = _read(_INPUT.value, tokenizer, _TEXT_TRUNCATE.value)
    pad = model.config.pad_id
    out = sys.stdout if _OUTPUT.value == "-" else open(_OUTPUT.value, "w")
    width = max((len(r) for r in rows), default=1)
    for start in range(0, len(rows), _BATCH.value):
        chunk = rows[start : start + _BATCH.value]
        batch = np.full((len(chunk), width), pad, np.int32)
        for i, ids in enumerate(chunk):
            batch[i, : len(ids)] = ids
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
