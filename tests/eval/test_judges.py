"""Which judge ``make_judge`` hands out, and that every judge speaks the same interface.

Evaluation grades with the judge and iterative CRINGE labels its training data
with it, so picking the wrong one (the ground truth on a real release, nothing
where a classifier was asked for) would silently change what a run measures.
"""

from __future__ import annotations

import json

import pytest

from bb3x_jax.data import synthetic
from bb3x_jax.eval import judges
from configs import cringe as cringe_config


def _config(manual_dir: str = "", judge: str = "auto", path: str = ""):
    config = cringe_config.get_config()
    config.data.manual_dir = manual_dir
    config.eval.judge = judge
    config.judge.path = path
    return config


def test_auto_on_the_synthetic_release_is_the_ground_truth(tmp_path):
    judge = judges.make_judge(_config(), str(tmp_path))
    assert isinstance(judge, judges.GroundTruthJudge)
    assert judge.bad_reasons == synthetic.BAD_REASONS
    context, good, rude = "Hi!\nDo you like hiking?", "Yes, I love hiking.", "Only an idiot would ask that."
    assert judge.verdicts([context, context], [good, rude]) == [synthetic.judge(context, good),
                                                               synthetic.judge(context, rude)]


def test_a_folder_the_synthesizer_wrote_counts_as_synthetic(tmp_path):
    release = tmp_path / "release"
    release.mkdir()
    (release / synthetic.GROUND_TRUTH_FILE).write_text("")
    assert isinstance(judges.make_judge(_config(str(release)), str(tmp_path)), judges.GroundTruthJudge)


def test_auto_on_a_real_release_without_a_classifier_is_no_judge(tmp_path):
    release = tmp_path / "release"
    release.mkdir()
    assert judges.make_judge(_config(str(release)), str(tmp_path / "workdir")) is None
    assert judges.make_judge(_config(judge="none"), str(tmp_path)) is None


def test_classifier_requested_but_absent_names_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "workdir" / judges.JUDGE_DIR)):
        judges.make_judge(_config(judge="classifier"), str(tmp_path / "workdir"))


def test_auto_on_a_real_release_takes_the_trained_classifier(tmp_path):
    """With a classifier folder present, ``auto`` loads it (here: a broken one, so the loader's own
    error proves it was the classifier that ``auto`` chose, by its configured path)."""
    release, folder = tmp_path / "release", tmp_path / "elsewhere" / "judge"
    release.mkdir()
    folder.mkdir(parents=True)
    (folder / judges.META_FILE).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(judges.JudgeLoadError, match="something else"):
        judges.make_judge(_config(str(release), path=str(folder)), str(tmp_path / "workdir"))


def test_judge_path_prefers_the_configured_path(tmp_path):
    assert judges.judge_path(_config(path="~/j"), "w").endswith("/j") and "~" not in judges.judge_path(
        _config(path="~/j"), "w")
    assert judges.judge_path(_config(), "w") == "w/judge"
