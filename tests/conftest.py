import os

# Sharded tests use 8 host devices; the flag must be set before jax initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
