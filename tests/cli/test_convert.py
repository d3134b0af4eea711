"""``python -m bb3x_jax.cli.convert``: user mistakes (tests/bad_inputs.py) end in one line and status 2,
an existing destination is never overwritten without ``--overwrite``, and with it is replaced."""

from __future__ import annotations

import os

import pytest

from tests import bad_inputs


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return bad_inputs.Models(str(tmp_path_factory.mktemp("models")))


@pytest.mark.parametrize("case", bad_inputs.cases("convert"), ids=lambda case: case.name)
def test_bad_conversion_is_one_line_and_status_2(case, tmp_path, models):
    bad_inputs.check(case, str(tmp_path), models)


def test_overwrite_replaces_an_existing_parlai_destination(tmp_path, models):
    dst = tmp_path / "out" / "model"
    dst.parent.mkdir()
    dst.write_bytes(b"an earlier export")
    out = bad_inputs.run("convert", [models.parlai_model, str(dst), "--to", "parlai", "--overwrite"])
    assert out.returncode == 0, out.stderr
    assert dst.read_bytes() != b"an earlier export" and os.path.exists(str(dst) + ".opt")
