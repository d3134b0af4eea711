"""Perplexity from summed NLL: defined for every model, including a diverged one."""

from __future__ import annotations

import math

from bb3x_jax.eval import likelihood


def test_perplexity_is_exp_of_the_mean_nll():
    assert math.isclose(likelihood.perplexity(6.0, 3), math.exp(2.0))


def test_a_diverged_models_perplexity_is_inf_not_an_overflow():
    """exp(800) overflows a float: evaluating a diverged model must still give a number (inf)."""
    assert likelihood.perplexity(800.0 * 5, 5) == float("inf")


def test_no_tokens_and_nan_nll_give_nan():
    assert math.isnan(likelihood.perplexity(0.0, 0))
    assert math.isnan(likelihood.perplexity(float("nan"), 4))
