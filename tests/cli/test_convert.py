"""``python -m bb3x_jax.cli.convert``: user mistakes (tests/bad_inputs.py) end in one line and status 2,
an existing destination is never overwritten without ``--overwrite``, and with it is replaced."""

from __future__ import annotations

import os

import pytest

from tests import bad_inputs


@pytest.mark.parametrize("case", bad_inputs.cases("convert"), ids=lambda case: case.name)
def test_bad_conversion_is_one_line_and_status_2(case, tmp_path, bad_input_models):
    bad_inputs.check(case, str(tmp_path), bad_input_models)


def test_overwrite_replaces_an_existing_parlai_destination(tmp_path, bad_input_models):
    dst = tmp_path / "out" / "model"
    dst.parent.mkdir()
    dst.write_bytes(b"an earlier export")
    out = bad_inputs.run("convert", [bad_input_models.parlai_model, str(dst), "--to", "parlai", "--overwrite"])
    assert out.returncode == 0, out.stderr
    assert dst.read_bytes() != b"an earlier export" and os.path.exists(str(dst) + ".opt")
