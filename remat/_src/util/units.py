"""Sizes in bytes, read and written one way (the command line, messages, tables).

``format_bytes`` writes binary units with two decimals (``"44.06 MiB"``), or
whole bytes below 1 KiB (``"1,018 B"``); ``exact=True`` adds the exact count
(``"44.06 MiB (46,199,800 bytes)"``) where a reader may need to type it back.
``parse_bytes`` reads what ``format_bytes`` writes, and the usual spellings
(``2GiB``, ``512MiB``, ``1.5GB``, ``1e9``).
"""

from __future__ import annotations

import decimal
import re

_UNITS = {"": 1, "b": 1, "byte": 1, "bytes": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6,
          "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}
_BINARY = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
# A number (thousands may be grouped with commas: 1,024), an optional exponent, an optional unit.
_SIZE_RE = re.compile(
    r"\s*((?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]\+?([0-9]+))?\s*([a-zA-Z]*)\s*")
_FORMS = "write e.g. 2GiB, 512MiB, 1.5GB, 4096 or 1e9 (KiB/MiB/GiB are powers of 2, kB/MB/GB of 10)"


def parse_bytes(text: str | int) -> int:
  """Reads a size in bytes: ``"2GiB"`` -> 2147483648.

  Accepts a number (``4096``, ``1e9``, ``1,024``) with an optional unit: ``B``,
  ``kB``/``MB``/``GB``/``TB`` (powers of 10) or ``KiB``/``MiB``/``GiB``/``TiB``
  (powers of 2), in any case. The result is rounded to whole bytes.

  Args:
    text: the size, or an int (returned as is when positive).

  Returns:
    The size in bytes, a positive int.

  Raises:
    ValueError: for anything else (negative, zero, unknown units, text), with
      the accepted forms.

  Example:

    >>> from remat._src.util.units import parse_bytes
    >>> parse_bytes("2GiB"), parse_bytes("1.5 GB"), parse_bytes("44.06 MiB")
    (2147483648, 1500000000, 46200259)
  """
  if isinstance(text, int) and not isinstance(text, bool):
    value = text
  else:
    s = str(text)
    m = _SIZE_RE.fullmatch(s)
    if s.strip().startswith("-"):
      raise ValueError(f"cannot read {s!r} as a size: sizes are positive; {_FORMS}.")
    if not m or m.group(3).lower() not in _UNITS:
      raise ValueError(f"cannot read {s!r} as a size in bytes; {_FORMS}.")
    number = decimal.Decimal(m.group(1).replace(",", "")).scaleb(int(m.group(2) or 0))
    value = int((number * _UNITS[m.group(3).lower()]).to_integral_value(decimal.ROUND_HALF_UP))
  if value < 1:
    raise ValueError(f"cannot read {text!r} as a size: it is less than one byte; {_FORMS}.")
  return int(value)


def format_bytes(n: float, *, exact: bool = False) -> str:
  """Writes a size in bytes: ``46199800`` -> ``"44.06 MiB"``.

  Args:
    n: bytes (an int or float; rounded to whole bytes).
    exact: also give the exact count, ``"44.06 MiB (46,199,800 bytes)"``.

  Example:

    >>> from remat._src.util.units import format_bytes
    >>> format_bytes(1018), format_bytes(46199800), format_bytes(46199800, exact=True)
    ('1,018 B', '44.06 MiB', '44.06 MiB (46,199,800 bytes)')
  """
  n = int(round(n))
  sign, a = ("-", -n) if n < 0 else ("", n)
  for unit, size in _BINARY:
    if a >= size:
      text = f"{sign}{a / size:,.2f} {unit}"
      return f"{text} ({n:,} bytes)" if exact else text
  return f"{n:,} B"


def exact_bytes(n: float) -> str:
  """``format_bytes(n, exact=True)``: how messages write a size the user may act on.

  Example:

    >>> from remat._src.util.units import exact_bytes
    >>> exact_bytes(46199800)
    '44.06 MiB (46,199,800 bytes)'
  """
  return format_bytes(n, exact=True)
