import os

# Sharded tests use 8 host devices; the flag must be set before jax initialises (this file is at the
# root so that it also runs before the doctests of remat/ and bench/ import jax).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
