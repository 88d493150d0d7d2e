"""Specification of JobCheckpointer: exact round trips, retention, asynchronous saves, and
surviving a torn save."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from harli_jax.lora.checkpoint import JobCheckpointer
from harli_jax.lora.optim import make_optimizer

PATHS = ("layers.0.self_attn.q_proj", "layers.1.mlp.down_proj")


OPTIMIZER = make_optimizer(1e-3, total_steps=10, warmup_steps=2, accumulate_steps=2)


@jax.jit
def trained_arrays(seed: jax.Array) -> tuple:
    """Adapter params, optimiser state after one accumulating micro-step, and an RNG key."""
    keys = jax.random.split(jax.random.key(seed), 3)
    params = {
        path: (
            jax.random.normal(keys[0], (16, 4), jnp.float32),
            jax.random.normal(keys[1], (4, 8), jnp.bfloat16),
        )
        for path in PATHS
    }
    grads = jax.tree.map(lambda p: jnp.full_like(p, seed + 1), params)
    _, opt_state = OPTIMIZER.update(grads, OPTIMIZER.init(params), params)
    return params, opt_state, keys[2]


def job_state(seed: int) -> dict:
    params, opt_state, rng = trained_arrays(seed)
    return {
        "params": params,
        "opt_state": opt_state,
        "step": 10 * seed + 7,
        "data": {"epoch": seed, "cursor": 3, "seed": 0, "fingerprint": 2**31 + seed},
        "rng": rng,
        "metadata": {"job": f"job-{seed}", "lr": 1e-3, "targets": ["q_proj", "down_proj"]},
    }


def assert_states_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in ("step", "data", "metadata"):
        assert got[key] == want[key] and type(got[key]) is type(want[key])
    assert jax.random.key_data(got["rng"]).tolist() == jax.random.key_data(want["rng"]).tolist()
    assert jax.dtypes.issubdtype(got["rng"].dtype, jax.dtypes.prng_key)
    for name in ("params", "opt_state"):
        assert jax.tree.structure(got[name]) == jax.tree.structure(want[name])
        for g, w in zip(jax.tree.leaves(got[name]), jax.tree.leaves(want[name]), strict=True):
            assert g.dtype == w.dtype
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_restore_round_trips_every_part_of_the_state_exactly(tmp_path):
    saved = job_state(seed=1)
    with JobCheckpointer(tmp_path) as checkpointer:
        checkpointer.save(17, saved)

    with JobCheckpointer(tmp_path) as checkpointer:
        restored = checkpointer.restore(like=job_state(seed=0))

    assert_states_equal(restored, saved)
    assert isinstance(restored["opt_state"], optax.MultiStepsState)


def test_restored_optimizer_state_continues_training_identically(tmp_path):
    state = job_state(seed=2)
    grads = jax.tree.map(jnp.ones_like, state["params"])
    with JobCheckpointer(tmp_path) as checkpointer:
        checkpointer.save(1, state)
        restored = checkpointer.restore(like=job_state(seed=0))

    update = jax.jit(OPTIMIZER.update)
    want, _ = update(grads, state["opt_state"], state["params"])
    got, _ = update(grads, restored["opt_state"], restored["params"])

    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_latest_step_is_the_newest_and_only_max_to_keep_remain(tmp_path):
    with JobCheckpointer(tmp_path, max_to_keep=2) as checkpointer:
        assert checkpointer.latest_step() is None
        for step in (5, 10, 15):
            checkpointer.save(step, job_state(seed=step))

        assert checkpointer.latest_step() == 15
        assert checkpointer.all_steps() == [10, 15]
        assert_states_equal(checkpointer.restore(10, like=job_state(0)), job_state(seed=10))


def test_a_save_keeps_the_state_it_was_given_when_its_buffers_are_donated_right_after(tmp_path):
    """Saves are asynchronous; the next train step donates the saved buffers as soon as `save`
    returns, and the checkpoint must still hold the values they had."""
    state = job_state(seed=1)
    overwrite = jax.jit(lambda tree: jax.tree.map(jnp.zeros_like, tree), donate_argnums=0)
    with JobCheckpointer(tmp_path) as checkpointer:
        checkpointer.save(1, state)
        overwrite((state["params"], state["opt_state"]))
    with JobCheckpointer(tmp_path) as checkpointer:
        assert_states_equal(checkpointer.restore(like=job_state(0)), job_state(seed=1))


def test_saving_a_step_again_keeps_the_first_save(tmp_path):
    with JobCheckpointer(tmp_path) as checkpointer:
        assert checkpointer.save(3, job_state(seed=1))
        assert not checkpointer.save(3, job_state(seed=2))
        assert_states_equal(checkpointer.restore(3, like=job_state(0)), job_state(seed=1))


def test_a_torn_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    with JobCheckpointer(tmp_path) as checkpointer:
        checkpointer.save(1, job_state(seed=1))
    # What a kill during save(2) leaves: Orbax's temporary directory, partly written.
    torn = tmp_path / "2.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(tmp_path / "1", torn)
    for path in sorted(p for p in torn.rglob("*") if p.is_file())[::2]:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    with JobCheckpointer(tmp_path) as checkpointer:
        assert checkpointer.latest_step() == 1
        assert_states_equal(checkpointer.restore(like=job_state(0)), job_state(seed=1))
        checkpointer.save(2, job_state(seed=2))  # the resumed job can save that step again
        assert checkpointer.latest_step() == 2


def test_restore_without_a_checkpoint_names_the_directory(tmp_path):
    with (
        JobCheckpointer(tmp_path) as checkpointer,
        pytest.raises(FileNotFoundError, match=str(tmp_path)),
    ):
        checkpointer.restore(like=job_state(0))
