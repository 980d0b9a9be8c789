import os

# Sharded tests use 8 host devices; the flag must be set before jax initialises (this file is at the
# root so that it also runs before the doctests of remat/ and bench/ import jax).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The persistent plan cache is off for the suite (each test plans from scratch); the tests of the
# cache turn it on in a temporary directory.
os.environ["REMAT_CACHE_DIR"] = ""

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
