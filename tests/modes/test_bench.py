"""--mode=bench: one JSON line with the promised fields, and a FLOP count that agrees with XLA's."""

from __future__ import annotations

import json

import jax
import pytest

from bb3x_jax import config as config_lib
from bb3x_jax.model import build
from bb3x_jax.model import config as model_config
from bb3x_jax.modes import bench
from bb3x_jax.train import step as step_lib
from configs import cringe as cringe_config


def test_bench_prints_one_json_line_with_the_promised_fields(tmp_path, capsys):
    """The output is exactly one JSON object with step time, throughput, params and (null on CPU) MFU."""
    config = cringe_config.get_config()
    config.bench.update({"batch": 4, "context": 16, "label": 8, "warmup": 1, "steps": 2, "decode_len": 5})
    result = bench.run(config_lib.validate(config), str(tmp_path))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1 and json.loads(lines[0]) == json.loads(json.dumps(result))
    for key in ("step_s_median", "tokens_per_s", "label_tokens_per_s", "params", "mfu", "model_flops_per_step",
                "decode_tokens_per_s"):
        assert key in result
    assert result["decode_tokens_per_s"] == pytest.approx(4 * 5 / result["decode_s_median"])
    assert result["tokens_per_s"] == pytest.approx(4 * 24 / result["step_s_median"])
    assert result["mfu"] is None and result["params"] > 0  # no known peak for CPUs


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_model_flops_match_xla_cost_analysis(arch):
    """The architecture's FLOP formula (the MFU numerator) is within 10% of XLA's count for the
    compiled train step, on a model wide enough for matmuls to dominate."""
    if arch == "encoder_decoder":
        cfg = model_config.ModelConfig(vocab_size=2048, d_model=256, n_heads=4, ffn_dim=1024,
                                       n_encoder_layers=1, n_decoder_layers=2, n_positions=128)
    else:
        cfg = model_config.preset("tiny_opt").replace(d_model=256, ffn_dim=1024, n_decoder_layers=2)
    batch, context, label = 2, 64, 16
    tx = step_lib.make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10)
    graphdef, state = step_lib.init_state(build.build(cfg), tx, 0)
    step = step_lib.make_train_step(graphdef, tx, pad_id=cfg.pad_id)
    data = bench.synthetic_batch(cfg, batch, context, label, 0.5, 0)
    cost = step.lower(state, jax.tree.map(jax.numpy.asarray, data)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    formula = bench.model_flops_per_step(cfg, batch, context, label)
    assert formula == pytest.approx(cost["flops"], rel=0.10)
