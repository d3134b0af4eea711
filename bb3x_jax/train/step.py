"""The train state and the pure, jitted train step.

State is explicit and passed in and out: ``TrainState`` holds the parameters,
the optimizer state, the step and the RNG key; the model's structure
(``graphdef``) is static. The step is ``(state, batch) -> (state, metrics)``,
jitted with the state donated, so the same function runs on one CPU or a
sharded mesh (the batch and the parameters carry their shardings in).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from bb3x_jax import cringe


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: Any  # nnx.State of nnx.Param
    rest: Any  # the model's other variables (RNG streams for dropout)
    opt_state: Any
    step: jax.Array
    rng: jax.Array


def lr_schedule(learning_rate: float, warmup_steps: int, total_steps: int, end_lr_ratio: float = 0.0):
    """Linear warmup, then linear decay to ``learning_rate * end_lr_ratio`` at ``total_steps``.

    Update n (counting from 1) gets ``lr * n / warmup`` while warming up:
    starting at lr / warmup instead of 0 makes the first update count.
    """

    def schedule(count):
        n = jnp.asarray(count).astype(jnp.float32) + 1.0
        warm = learning_rate * jnp.minimum(1.0, n / max(warmup_steps, 1))
        frac = jnp.clip((n - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
        decayed = learning_rate * (1.0 - (1.0 - end_lr_ratio) * frac)
        return jnp.where(n <= warmup_steps, warm, decayed)

    return schedule


def make_optimizer(
    *,
    learning_rate: float,
    warmup_steps: int,
    total_steps: int,
    weight_decay: float = 0.0,
    clip_norm: float | None = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    grad_accum: int = 1,
    end_lr_ratio: float = 0.0,
) -> optax.GradientTransformation:
    """AdamW with linear warmup then linear decay, global-norm clipping, optional accumulation.

    With ``grad_accum`` = k, k calls average their gradients and update once
    (``optax.MultiSteps``); the schedule counts updates, not calls.
    """
    schedule = lr_schedule(learning_rate, warmup_steps, total_steps, end_lr_ratio)
    parts = []
    if clip_norm:
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    tx = optax.chain(*parts)
    return optax.MultiSteps(tx, every_k_schedule=grad_accum) if grad_accum > 1 else tx


def init_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int, mesh=None) -> tuple[Any, TrainState]:
    """(graphdef, state) for a model; the optimizer state inherits the parameters' shardings.

    With ``mesh``, every leaf that is not already placed on it (step counter,
    RNG key, optimizer counts) is replicated over it, so the state has the
    same shardings before and after a step and the step compiles once.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # Eager, not jitted: each moment is created with its parameter's sharding (a jitted
    # init returns them unplaced, and place() below would replicate them on every device).
    opt_state = tx.init(params)
    step, rng = jnp.zeros((), jnp.int32), jax.random.key(seed)
    if mesh is not None:
        replicated = NamedSharding(mesh, PartitionSpec())
        # Made on the mesh: with several processes device_put cannot place a key array there.
        step, rng = jax.jit(lambda: (jnp.zeros((), jnp.int32), jax.random.key(seed)), out_shardings=replicated)()
    state = TrainState(params, rest, opt_state, step, rng)
    if mesh is not None:

        def place(x):
            return x if isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh else jax.device_put(x, replicated)

        state = jax.tree.map(place, state)
    return graphdef, state


def make_train_step(graphdef, tx: optax.GradientTransformation, *, objective: str = "cringe",
                    kl_anchor: float = 0.0, kl_anchor_direction: str = "forward", **objective_kwargs):
    """The jitted ``(state, batch, anchor=None) -> (state, metrics)`` step (state donated).

    ``batch`` has ``context_ids``, ``label_ids`` (label tokens, end token, pad)
    and ``feedback`` as the input pipeline produces them; padding rows have
    all-pad labels and so contribute nothing. Pass ``pad_id`` in
    ``objective_kwargs`` for models whose pad id is not 0 (OPT: 1).

    With ``kl_anchor`` > 0 the step needs ``anchor``, parameters of the same
    network (the model the run started from): the loss gains ``kl_anchor`` times
    the mean ``cringe.anchor_kl`` (``kl_anchor_direction``) over non-pad target tokens, from one extra
    forward pass of the anchor without dropout, and the metrics gain
    ``kl_anchor`` (that mean, unweighted).
    """
    pad_id = objective_kwargs.get("pad_id", 0)

    def loss_fn(model, batch, loss_key, anchor_logits):
        logits = model.label_logits(batch["context_ids"], batch["label_ids"], deterministic=False)
        loss, metrics = cringe.objective_loss(objective, logits, batch["label_ids"], batch["feedback"], loss_key,
                                              **objective_kwargs)
        if anchor_logits is not None:
            kl, covered = cringe.anchor_kl(logits, anchor_logits, batch["label_ids"], batch["feedback"], pad_id=pad_id,
                                           direction=kl_anchor_direction)
            mean_kl = jnp.sum(kl) / jnp.maximum(jnp.sum(covered, dtype=jnp.float32), 1.0)
            loss = loss + kl_anchor * mean_kl
            metrics = dict(metrics, loss=loss, kl_anchor=mean_kl)
        return loss, metrics

    def step(state: TrainState, batch: dict[str, jax.Array], anchor: Any = None):
        rng, dropout_key, loss_key = jax.random.split(state.rng, 3)
        anchor_logits = None
        if kl_anchor:
            if anchor is None:
                raise ValueError("kl_anchor > 0: pass the anchor parameters to the step")
            anchor_model = nnx.merge(graphdef, anchor, state.rest)
            anchor_logits = lax.stop_gradient(
                anchor_model.label_logits(batch["context_ids"], batch["label_ids"], deterministic=True))
        model = nnx.merge(graphdef, state.params, state.rest)
        # Dropout keys come from the state's key: a step is a pure function of (state, batch).
        nnx.reseed(model, default=dropout_key)
        # nnx.value_and_grad carries the model's RNG-state updates through the trace;
        # it runs once, at trace time, inside the plain jax.jit below.
        (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch, loss_key, anchor_logits)
        _, _, rest = nnx.split(model, nnx.Param, ...)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
        return TrainState(params, rest, opt_state, state.step + 1, rng), metrics

    return jax.jit(step, donate_argnums=0)
