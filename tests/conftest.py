"""Strict test environment: two CPU devices, rank promotion raises.

Strict dtype promotion is not switched on: optax's and Flax's own code mixes
bfloat16 and float32 internally, which the comparisons against optax need.
"""

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_numpy_rank_promotion", "raise")

# Scripts run in their own processes (they configure JAX's devices at import).
collect_ignore = ["parallel_scripts"]


@pytest.fixture
def getkey():
    """Return a function that hands out fresh PRNG keys, deterministically."""
    key = jax.random.key(0)

    def next_key():
        nonlocal key
        key, sub = jax.random.split(key)
        return sub

    return next_key
