"""When a multi-stage job may reuse a finished stage (``bb3x_jax.train.stages``).

Protects the rule that an output is reused only for the settings that made it: an evaluation's
settings cover what decides its numbers and nothing else (so a changed worker count does not redo
it), and paths into a moved workdir still count as the same.
"""

from __future__ import annotations

import os

from bb3x_jax.train import stages
from configs import cringe


def test_evaluation_settings_cover_what_decides_the_numbers_only():
    """Generation, evaluation, data, model, judge settings and the seed are recorded; where the data is
    kept and how many workers read it are not; the checkpoint is recorded relative to the run."""
    config = cringe.get_config()
    settings = stages.evaluation_settings(config, "/w/run/checkpoints/6", "/w/run")
    assert settings["checkpoint"] == os.path.join("checkpoints", "6")
    for key in ("generation.max_len", "eval.generate_examples", "eval.split", "data.stream", "model.preset", "seed"):
        assert key in settings, key
    for key in ("data.dir", "data.pipeline_workers", "data.prefetch", "judge.path", "train.steps", "serve.port"):
        assert key not in settings, key
    other = cringe.get_config()
    other.data.pipeline_workers += 1
    assert stages.changed_settings(settings, stages.evaluation_settings(other, "/w/run/checkpoints/6", "/w/run")) == []
    other.generation.max_len += 1
    assert stages.changed_settings(settings, stages.evaluation_settings(other, "/w/run/checkpoints/6", "/w/run")) \
        == ["generation.max_len"]
    assert stages.changed_settings(None, settings) == sorted(settings)  # nothing recorded: all differ


def test_paths_into_a_moved_workdir_are_the_same_place(tmp_path):
    """A starting checkpoint or generated split recorded under the workdir's old location matches the
    same place under the new one; another place does not."""
    workdir = str(tmp_path / "new")
    new = os.path.join(workdir, "iterations", "1", "generated")
    assert stages._same_place("/old/wd/iterations/1/generated", new, workdir)
    assert stages._same_place(new, new, workdir)
    assert not stages._same_place("/old/wd/iterations/2/generated", new, workdir)
    assert not stages._same_place("/old/wd/iterations/1/generated", "/elsewhere/iterations/1/generated", workdir)
    assert not stages._same_place("", new, workdir)


def test_a_moved_workdirs_start_and_anchor_are_aligned(tmp_path):
    """A finished run recorded under the workdir's old location (its start, its KL anchor) compares as
    made at the new one; an anchor elsewhere stays as recorded, so the difference is reported."""
    workdir = str(tmp_path / "new")
    now = {"train": {"init_from": os.path.join(workdir, "iterations", "1", "checkpoints", "300"),
                     "kl_anchor_from": os.path.join(workdir, "checkpoints", "4000")}, "data": {}}
    saved = {"train": {"init_from": "/old/wd/iterations/1/checkpoints/300",
                       "kl_anchor_from": "/old/wd/checkpoints/4000"}, "data": {}}
    assert stages._align_paths(saved, now, workdir)["train"] == now["train"]
    saved["train"]["kl_anchor_from"] = "/models/other/4000"
    assert stages._align_paths(saved, now, workdir)["train"]["kl_anchor_from"] == "/models/other/4000"
