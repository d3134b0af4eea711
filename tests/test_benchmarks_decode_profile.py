"""benchmarks/decode_profile.py: the trace of the real search is read, every executed op lands in one
(part, kind) group, and both the prompt's and the token loop's matmuls are found, for greedy and beam."""

from __future__ import annotations

import pytest

from tests import benchmark_scripts


@pytest.fixture(scope="module")
def script():
    return benchmark_scripts.load("decode_profile")


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_groups_cover_the_prompt_and_the_loop_and_add_up(script, method):
    """Prompt and loop each have matmul time; the loop's per-step figure is its time over the tokens; the
    groups sum to the profiled total; the top ops are the slowest singles, slowest first."""
    *rest, total = script.main(["--tiny", "--method", method, "--top", "3"])
    groups = {(r["part"], r["kind"]): r for r in rest if "part" in r}
    assert {part for part, _ in groups} == {"prompt", "loop"}
    assert {kind for _, kind in groups} <= {"matmul", "copy/transpose", "elementwise"}
    for key in [("prompt", "matmul"), ("loop", "matmul")]:
        assert groups[key]["ms_per_search"] > 0 and groups[key]["ops"] > 0, key
    loop = groups[("loop", "matmul")]
    assert loop["ms_per_token_step"] == pytest.approx(loop["ms_per_search"] / total["new_tokens"], abs=2e-3)
    assert total["model"] == "tiny" and total["method"] == method and total["search_s_median"] > 0
    assert total["beams"] == (2 if method == "beam" else 1)
    assert sum(g["ms_per_search"] for g in groups.values()) == pytest.approx(total["profiled_ms_per_search"], abs=0.2)
    tops = [r for r in rest if "op" in r]
    assert len(tops) == 3 and [t["ms_per_search"] for t in tops] == sorted((t["ms_per_search"] for t in tops),
                                                                           reverse=True)


def test_bad_arguments_are_refused(script):
    with pytest.raises(SystemExit):
        script.parse_args(["--method", "beam", "--beams", "1"])
