"""BB3-30B / 175B's dialogue prompt for decoder-only (OPT) checkpoints.

BB3's OPT agents (ParlAI ``projects/bb3/agents/opt_api_agent.py``,
``BB3PromptHistory``; ``module.py``'s vanilla dialogue module ``vrm``) turn the
dialogue history into one prompt::

    A conversation between two persons.\\n\\nPerson 1: hi\\nPerson 2: hello\\nPerson 1: how are you?\\nPerson 2:

* The context's lines are speaker turns counted from the END: the last line is
  the partner's (``Person 1``), the one before it the bot's (``Person 2``), and
  so on. A line that is empty, holds ``__SILENCE__`` or is ``Opening`` is
  skipped but still takes its speaker's place. Leading persona lines (holding
  ``your persona`` or ``Person 1's Persona`` / ``Person 2's Persona``) stay
  as they are, before the turns.
* The prompt is the vrm instruction, the turns joined with ``"\\n"``, and
  ``"\\nPerson 2:"``; no few-shot examples (``--num-shots 0``; BB3's deployed
  opt files could not be checked here). With no turn left it is just
  ``"Person 2:"``, as BB3 renders it.
* Truncation drops whole turns from the front (BB3 drops them until the prompt
  is under ``--max-prompt-len``) until ``[</s>] + prompt`` has at most
  ``text_truncate`` tokens. The count is exact (the prompt is encoded);
  dropping a turn never adds tokens, because every turn after the first
  starts right after a ``"\\n"`` that is a BPE piece of its own, so the first
  fitting prompt is found by searching instead of encoding every candidate.
* The model continues with ``" " + response`` (BB3 builds prompt + ``" "`` +
  label) and this project ends it with ``</s>`` (id 2), where BB3's API
  stopped at a newline.

The prompt starts with ``</s>`` (id 2), as transformers' OPT tokenizer and
metaseq prompts do.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

BB3_OPT_INSTRUCTION = "A conversation between two persons.\n\n"
PARTNER, SELF = "Person 1", "Person 2"
FINAL_PREFIX = f"{SELF}:"
BB3_OPT_LABEL_PREFIX = " "
_PERSONA_MARKERS = ("your persona", f"{SELF}'s Persona", f"{PARTNER}'s Persona")
_SKIPPED_LINE = ("__SILENCE__", "Opening")


def bb3_opt_turns(context: str) -> list[str]:
    """The context's lines as BB3's prompt history holds them (module docstring)."""
    lines = context.split("\n")
    head = []
    while lines and any(marker in lines[0] for marker in _PERSONA_MARKERS):
        head.append(lines.pop(0))
    turns: list[str] = []
    for speaker, line in zip(itertools.cycle([PARTNER, SELF]), reversed(lines)):
        if "__SILENCE__" in line or line == "Opening" or not line.strip():
            continue
        turns.insert(0, f"{speaker}: {line}")
    return head + turns


def render_bb3_opt_prompt(turns: Sequence[str]) -> str:
    """The prompt text for these turns (the oldest may already be dropped)."""
    turns = list(turns)
    if turns and turns[-1].strip() == FINAL_PREFIX:
        turns = turns[:-1]
    if not turns:
        return FINAL_PREFIX
    return BB3_OPT_INSTRUCTION + "\n".join(turns) + "\n" + FINAL_PREFIX


def encode_bb3_opt_prompts(contexts: Sequence[str], tokenizer, text_truncate: int) -> list[list[int]]:
    """``[</s>] + encode(prompt)`` of each context with as many of its latest turns as fit
    ``text_truncate`` tokens (the fewest turns dropped)."""
    bos = [tokenizer.start_id]
    out = []
    for context in contexts:
        turns = bb3_opt_turns(context)

        def ids(dropped: int) -> list[int]:
            return bos + tokenizer.encode(render_bb3_opt_prompt(turns[dropped:]))

        full = ids(0)
        if len(full) <= text_truncate or not turns:
            out.append(full if len(full) <= text_truncate else full[:text_truncate])
            continue
        # The fewest dropped turns that fit: bisect on [lo, hi] with hi fitting.
        lo, hi = 0, len(turns)
        best = ids(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            candidate = ids(mid)
            if len(candidate) <= text_truncate:
                hi, best = mid, candidate
            else:
                lo = mid
        out.append(best if len(best) <= text_truncate else best[:text_truncate])
    return out
