"""Type aliases used in public signatures (in the spirit of chex's ``pytypes``)."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import jax

Array = jax.Array
ArrayTree = Any
PRNGKey = jax.Array  # a typed key (``jax.random.key``) or a raw ``uint32[2]`` key
Shape = tuple[int, ...]
F = TypeVar("F", bound=Callable[..., Any])
