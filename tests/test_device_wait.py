"""`wait_until_ready`: the host's wait for a device result."""

import jax.numpy as jnp
import numpy as np

from harli_jax.engine.device_wait import wait_until_ready


def test_it_returns_the_array_computed():
    array = jnp.arange(4.0) * 2
    out = wait_until_ready(array)
    assert out is array and out.is_ready()
    np.testing.assert_array_equal(np.asarray(out), [0.0, 2.0, 4.0, 6.0])
