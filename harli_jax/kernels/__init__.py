"""Hand-written device kernels for the hot paths, each with a pure-JAX reference."""
