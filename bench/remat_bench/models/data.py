"""Data for the reference models: a character-level text corpus, and synthetic inputs.

``corpus.txt`` ships with the package (about 230 KB, no downloads). It is
assembled from the docstrings of 45 modules of the CPython 3.11 standard
library (``collections``, ``functools``, ``json``, ``argparse`` …; Python
Software Foundation License), reduced to printable ASCII and newlines, in
module order. It is real English prose with code examples: enough for a small
character-level language model to learn something in a few hundred steps.
"""

from __future__ import annotations

import pathlib
from typing import Iterator

import jax
import numpy as np

CORPUS_PATH = pathlib.Path(__file__).with_name("corpus.txt")

# Newline plus the 95 printable ASCII characters: every character in the corpus.
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB_SIZE = len(VOCAB)  # 96
_INDEX = {c: i for i, c in enumerate(VOCAB)}


def load_corpus() -> str:
  """The shipped text corpus as one string.

  Example:

    >>> from remat_bench.models import data
    >>> len(data.load_corpus()) > 100_000
    True
  """
  return CORPUS_PATH.read_text(encoding="ascii")


def encode(text: str) -> np.ndarray:
  """Characters to token ids (``int32``); characters outside the vocabulary raise.

  Raises:
    ValueError: if ``text`` has a character outside :data:`VOCAB`.

  Example:

    >>> from remat_bench.models import data
    >>> data.decode(data.encode("remat"))
    'remat'
  """
  try:
    return np.array([_INDEX[c] for c in text], dtype=np.int32)
  except KeyError as e:
    raise ValueError(
        f"`remat_bench.models.data.encode`: character {e.args[0]!r} is not in the vocabulary "
        "(newline and printable ASCII).") from None


def decode(ids) -> str:
  """Token ids back to text."""
  return "".join(VOCAB[int(i)] for i in np.asarray(ids).reshape(-1))


def lm_batches(batch_size: int, seq_len: int, *, seed: int = 0, split: str = "train",
               tokens: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Endless random windows of the corpus for next-character prediction.

  Args:
    batch_size: windows per batch.
    seq_len: characters per window.
    seed: seed of the window positions (same seed, same batches).
    split: ``"train"`` (first 90% of the corpus) or ``"valid"`` (last 10%).
    tokens: the encoded corpus (default: :func:`load_corpus`, encoded).

  Returns:
    An iterator of ``(inputs, targets)``, both ``int32[batch_size, seq_len]``;
    ``targets`` is ``inputs`` shifted by one character.

  Raises:
    ValueError: if ``split`` is unknown or the split is shorter than a window.

  Example:

    >>> from remat_bench.models import data
    >>> x, y = next(data.lm_batches(2, 8))
    >>> x.shape, bool((x[:, 1:] == y[:, :-1]).all())
    ((2, 8), True)
  """
  if tokens is None:
    tokens = encode(load_corpus())
  cut = int(len(tokens) * 0.9)
  if split == "train":
    part = tokens[:cut]
  elif split == "valid":
    part = tokens[cut:]
  else:
    raise ValueError(f"`remat_bench.models.data.lm_batches`: `split` must be 'train' or 'valid', "
                     f"got {split!r}.")
  if len(part) <= seq_len + 1:
    raise ValueError(f"`remat_bench.models.data.lm_batches`: the {split} split has {len(part)} tokens, "
                     f"fewer than seq_len + 1 = {seq_len + 1}.")
  rng = np.random.default_rng(seed)
  offsets = np.arange(seq_len + 1)
  while True:
    starts = rng.integers(0, len(part) - seq_len - 1, size=batch_size)
    window = part[starts[:, None] + offsets[None, :]]
    yield window[:, :-1], window[:, 1:]


def image_batch(key: jax.Array, batch_size: int = 8, size: int = 16, channels: int = 3,
                num_classes: int = 10) -> tuple[jax.Array, jax.Array]:
  """A synthetic NHWC image batch and integer labels (for the CNN).

  Example:

    >>> import jax
    >>> from remat_bench.models import data
    >>> x, y = data.image_batch(jax.random.key(0), 4)
    >>> x.shape, y.shape
    ((4, 16, 16, 3), (4,))
  """
  kx, ky = jax.random.split(key)
  x = jax.random.normal(kx, (batch_size, size, size, channels))
  y = jax.random.randint(ky, (batch_size,), 0, num_classes)
  return x, y
