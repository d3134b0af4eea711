"""--mode=iterate with iterate.deployment: a deployment folder's ratings replace generate + judge once.

Protects what such an iteration trains on: exactly the rated bot messages of the
folder's train chunks (context = the previous texts joined with "\\n", as the
reference loader makes it; class from the ratings), from the workdir's newest
model, with the held-out and unrated messages counted and never used; and that
the same feedback is never trained on twice, while a bad folder fails in one
line naming the key. The folder is written here line by line in the chat
server's format, most of its 100 chunk files empty, as a small deployment's are.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from bb3x_jax.data import schema
from tests import shared_runs
from tests.modes.test_train import fresh_workdir, run_main

HELD_OUT_CHUNKS = (1, 4)  # a test and a valid chunk
TRAIN_CHUNKS = (6, 42, 99)
DEPLOYMENT_FLAGS = (
    "--config.iterate.steps=4", "--config.eval.generate_examples=4", "--config.eval.generate_batch=4",
    "--config.eval.batches=2", "--config.generation.beam_size=2", "--config.generation.max_len=8",
    "--config.eval.checkpoint=latest",
)
SAFE = {"duo_safety": "__ok__", "string_matcher": "__ok__"}


def human_message(text: str, index: int) -> dict:
    return {"text": text, "sender": "human", "safety": dict(SAFE), "human_message_id": f"h{index}",
            "isDislikeFeedback": False}


def bot_message(text: str, index: int, rating: str | None) -> dict:
    """A bot message as the server writes it; ``rating``: None, "like" or a dislike type."""
    return {"text": text, "sender": "bot", "safety": dict(SAFE), "bot_message_id": f"b{index}",
            "isLiked": rating == "like", "isDisliked": rating not in (None, "like"),
            "dislike_type": "" if rating in (None, "like") else rating, "memories": [], "memory_decision": "",
            "memory_knowledge": "", "search_decision": "", "search_query": "", "search_knowledge": "",
            "search_knowledge_doc_titles": [], "search_knowledge_doc_content": [], "search_knowledge_doc_urls": [],
            "isSafetyControlledResponse": False, "previous_interaction_failure": "", "from_model_crash": False}


def synthetic_dialogues(workdir: str, count: int) -> list[list[str]]:
    """The texts of ``count`` conversations of the workdir's synthetic release (human first)."""
    folder = os.path.join(workdir, "synthetic_release")
    dialogues = []
    for name in sorted(os.listdir(folder)):
        if name.startswith("release_data_"):
            for line in open(os.path.join(folder, name), encoding="utf-8"):
                history = json.loads(line)["message_history"]
                if len(history) >= 4 and history[0]["sender"].lower() == "human":
                    dialogues.append([m["text"] for m in history])
    return dialogues[:count]


def ratings(dialogues: list[list[str]]) -> dict[tuple[int, int], str]:
    """(conversation, message index) -> "like" or a dislike type, for bot replies after the first: the
    synthetic world's judge decides (good: liked, bad: disliked with its reason). In the train chunks as
    many are liked as disliked, and no liked (context, reply) twice, so balancing keeps every one."""
    from bb3x_jax.data import synthetic

    verdicts = {(j, i): synthetic.judge("\n".join(texts[:i]), texts[i])
                for j, texts in enumerate(dialogues) for i in range(3, len(texts), 2)}
    held_out = {key: v for key, v in verdicts.items() if chunk_of(key[0]) in HELD_OUT_CHUNKS}
    liked, disliked, pairs = [], [], set()
    for (j, i), verdict in verdicts.items():
        pair = ("\n".join(dialogues[j][:i]), dialogues[j][i])
        if chunk_of(j) in TRAIN_CHUNKS and verdict == "good" and pair not in pairs:
            liked.append((j, i))
            pairs.add(pair)
        elif chunk_of(j) in TRAIN_CHUNKS and verdict != "good":
            disliked.append((j, i))
    n = min(len(liked), len(disliked))
    chosen = {**{key: "like" for key in liked[:n]}, **{key: verdicts[key] for key in disliked[:n]}}
    return {**{key: "like" if v == "good" else v for key, v in held_out.items()}, **chosen}


def chunk_of(conversation: int) -> int:
    chunks = HELD_OUT_CHUNKS + TRAIN_CHUNKS
    return chunks[conversation % len(chunks)]


def write_deployment(folder: str, dialogues: list[list[str]], rated: dict[tuple[int, int], str]) -> None:
    """All 100 chunk files in the server's format, most of them empty; conversation j in ``chunk_of(j)``."""
    lines: dict[int, list[str]] = {c: [] for c in range(100)}
    for j, texts in enumerate(dialogues):
        history = [human_message(text, i) if i % 2 == 0 else bot_message(text, i, rated.get((j, i)))
                   for i, text in enumerate(texts)]
        convo = {"user_pseudo_id": f"user{j % 7}", "chat_id": f"chat{j}", "message_history": history}
        lines[chunk_of(j)].append(json.dumps(convo, ensure_ascii=False))
    os.makedirs(folder, exist_ok=True)
    for chunk, chunk_lines in lines.items():
        with open(os.path.join(folder, f"release_data_{chunk:02d}.jsonl"), "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in chunk_lines))


def expected_split(dialogues: list[list[str]], rated: dict[tuple[int, int], str]) -> dict:
    """What iterate must make of the folder: the train-chunk examples (context, label, feedback), sorted,
    and the counts of the bot messages with a context that it leaves out."""
    examples, counts = [], {"unlabeled_skipped": 0, "held_out_skipped": 0}
    for j, texts in enumerate(dialogues):
        for i in range(1, len(texts), 2):
            if chunk_of(j) in HELD_OUT_CHUNKS:
                counts["held_out_skipped"] += 1
            elif (j, i) in rated:
                examples.append(("\n".join(texts[:i]), texts[i], int(rated[(j, i)] == "like")))
            else:
                counts["unlabeled_skipped"] += 1
    positive = sum(feedback for _, _, feedback in examples)
    return {"examples": sorted(examples), "rated_positive": positive, "rated_negative": len(examples) - positive,
            **counts}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A workdir with a prepared release and a 12-step MLE model (iteration 0), as test_iterate's."""
    return fresh_workdir(shared_runs.mle_base(), tmp_path_factory.mktemp("deployment_base"), "run")


@pytest.fixture(scope="module")
def deployment(base, tmp_path_factory):
    """(folder, expected split): 40 synthetic conversations rated and written in the server's format."""
    folder = str(tmp_path_factory.mktemp("deployment") / "chats")
    dialogues = synthetic_dialogues(base, 40)
    rated = ratings(dialogues)
    write_deployment(folder, dialogues, rated)
    return folder, expected_split(dialogues, rated)


@pytest.fixture(scope="module")
def iterated(base, deployment, tmp_path_factory):
    """(workdir, output) of --mode=iterate with iterate.deployment on a copy of the base workdir."""
    workdir = fresh_workdir(base, tmp_path_factory.mktemp("deployment_run"), "run")
    out = run_main(workdir, *DEPLOYMENT_FLAGS, f"--config.iterate.deployment={deployment[0]}", mode="iterate")
    return workdir, out


def one_error_line(out) -> str:
    """The failed run's stderr, asserted to be one line and status 2."""
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert "Traceback" not in out.stderr and out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_one_iteration_trains_on_exactly_the_rated_train_chunk_replies(iterated, deployment):
    """The run makes iteration 1 only: its split holds exactly the rated bot replies of the train chunks
    (contexts, labels and classes as written), records the folder, its fingerprint and what was left out
    (held-out and unrated replies), trains iterate.steps from the workdir's model on the train split plus
    that split, and results.json gets its row."""
    workdir, out = iterated
    folder, expected = deployment
    split = os.path.join(workdir, "iterations", "1", "generated")
    examples = [json.loads(line) for line in open(os.path.join(split, "examples.jsonl"))]
    assert sorted((e["context"], e["label"], e["feedback"]) for e in examples) == expected["examples"]
    assert all(e["iteration"] == 1 and e["feedback_source"] in ("like", "dislike") for e in examples)
    meta = json.load(open(os.path.join(split, "meta.json")))
    start = os.path.join(workdir, "checkpoints", "12")
    assert meta["labels"] == "deployment feedback" and "judge" not in meta
    assert meta["deployment"] == folder and len(meta["deployment_fingerprint"]) == 16
    assert meta["model"] == start
    counts = meta["deployment_counts"]
    for key in ("rated_positive", "rated_negative", "unlabeled_skipped", "held_out_skipped"):
        assert counts[key] == expected[key], key
    assert counts["malformed_skipped"] == 0 and counts["conversations"] == 40 and counts["empty_chunk_files"] == 95
    assert meta["positive"] == meta["negative"] == expected["rated_positive"] == expected["rated_negative"]
    saved = json.load(open(os.path.join(workdir, "iterations", "1", "checkpoints", "4", "meta", "metadata")))
    assert saved["config"]["train"]["init_from"] == start and saved["config"]["train"]["steps"] == 4
    assert saved["config"]["data"]["extra_train"] == [split]
    assert not os.path.exists(os.path.join(workdir, "iterations", "2"))
    rows = json.load(open(os.path.join(workdir, "iterations", "results.json")))["rows"]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert rows[1]["model"] == os.path.join(workdir, "iterations", "1", "checkpoints", "4")
    assert rows[1]["train_generated"] == {"good_rate": 0.5, "positive": meta["positive"],
                                          "negative": meta["negative"], "deployment": folder}
    assert rows[1]["generations"] == 4
    assert f"rated replies from {folder}" in out.stdout and "| iteration | good % |" in out.stdout


def test_the_same_feedback_is_refused_and_new_feedback_is_the_next_iteration(iterated, deployment, tmp_path):
    """A second run with the same folder stops in one line (status 2) naming the folder and the iteration
    that trained on it, and changes nothing; a copy elsewhere is the same feedback, while a folder whose
    content changed is taken as the next iteration's."""
    from bb3x_jax import config as config_lib
    from bb3x_jax.data import deployment_feedback
    from bb3x_jax.data.feedback import DEFAULT_POLICY
    from bb3x_jax.modes import iterate
    from configs import cringe

    workdir = str(tmp_path / "copy")
    shutil.copytree(iterated[0], workdir, symlinks=True)
    folder = deployment[0]
    line = one_error_line(run_main(workdir, *DEPLOYMENT_FLAGS, f"--config.iterate.deployment={folder}",
                                   mode="iterate", check=False))
    assert "config.iterate.deployment" in line and folder in line and "iteration 1 already trained" in line
    assert not os.path.exists(os.path.join(workdir, "iterations", "2"))

    config = cringe.get_config()
    copy = shutil.copytree(folder, str(tmp_path / "same"))
    with pytest.raises(config_lib.ConfigError, match="iteration 1 already trained"):
        iterate.deployment_iteration(config, workdir, deployment_feedback.read(copy, DEFAULT_POLICY))
    with open(os.path.join(copy, "release_data_42.jsonl"), "a") as f:
        history = [human_message("Hi!", 0), bot_message("Hello there!", 1, None),
                   human_message("Do you like comets?", 2), bot_message("Yes, I love comets.", 3, "like")]
        f.write(json.dumps({"user_pseudo_id": "u", "chat_id": "new", "message_history": history}) + "\n")
    assert iterate.deployment_iteration(config, workdir, deployment_feedback.read(copy, DEFAULT_POLICY)) == 2


@pytest.mark.parametrize("case", ["missing", "no_chunk_files", "nothing_rated", "only_liked"])
def test_a_bad_folder_is_one_line_naming_the_key(case, base, tmp_path):
    """A missing folder, one without chunk files, one whose train chunks hold no rated reply and one with
    only liked replies (nothing to balance them with) each end the run in one line (status 2) naming
    iterate.deployment and the folder, before anything is evaluated or trained."""
    folder = str(tmp_path / "chats")
    if case == "no_chunk_files":
        os.makedirs(folder)
        open(os.path.join(folder, "notes.txt"), "w").close()
    elif case in ("nothing_rated", "only_liked"):
        dialogues = synthetic_dialogues(base, 10)
        liked = {(j, i): "like" for j, texts in enumerate(dialogues) for i in range(1, len(texts), 2)}
        write_deployment(folder, dialogues, liked if case == "only_liked" else {})
    workdir = fresh_workdir(base, tmp_path, "run")
    line = one_error_line(run_main(workdir, *DEPLOYMENT_FLAGS, f"--config.iterate.deployment={folder}",
                                   mode="iterate", check=False))
    assert "config.iterate.deployment" in line and folder in line
    assert not os.path.exists(os.path.join(workdir, "iterations"))


def test_plain_training_data_reads_a_mostly_empty_deployment_folder(deployment, tmp_path):
    """The same folder as a release (--config.data.manual_dir), 95 of its 100 chunk files empty, prepares
    with the rated and unrated replies of its train chunks as the train split's classes."""
    folder, expected = deployment
    workdir = str(tmp_path / "data")
    run_main(workdir, "--config.data_check.batches=1", f"--config.data.manual_dir={folder}", mode="data")
    train = json.load(open(os.path.join(workdir, "data_check.json")))["splits"]["train"]
    assert (train["positive"], train["negative"], train["unlabeled"]) == (
        expected["rated_positive"], expected["rated_negative"], expected["unlabeled_skipped"])
    assert train["skipped"] == 0 and train["empty_chunk_files"] == 91


def test_training_on_a_folder_without_valid_conversations_is_one_line_before_any_step(deployment, tmp_path):
    """Training validates on chunks 03-05; a small deployment may have none there, which is refused in
    one line naming the split and its chunk files before a step is taken or a checkpoint written."""
    folder = str(tmp_path / "no_valid")
    shutil.copytree(deployment[0], folder)
    for chunk in schema.SPLIT_CHUNKS["valid"]:
        open(os.path.join(folder, f"release_data_{chunk:02d}.jsonl"), "w").close()
    workdir = str(tmp_path / "train")
    out = run_main(workdir, f"--config.data.manual_dir={folder}", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]  # after the preparation's log
    assert len(errors) == 1 and out.stderr.rstrip().endswith(errors[0]), out.stderr[-3000:]
    line = errors[0]
    assert "split 'valid' has no examples" in line and "release_data_03..05.jsonl" in line, line
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
