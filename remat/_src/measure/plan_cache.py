"""The persistent plan cache: plans and per-layer costs, reused by later processes.

Planning compiles (``remat.fit``: the whole step several times; ``budget``: the
chain's reference step; both: each distinct layer to measure its costs). What
they find depends only on the programs, the shapes, the memory, the devices
and the software, so it is stored on disk under a key that covers all of them
(``key``) and read back by the next process. A cached plan is never trusted:
its step (or chain) is compiled once more and its peak checked against the
memory before it is used; a stale entry means a new search, never a plan that
does not fit.

Where: ``REMAT_CACHE_DIR`` if set (``REMAT_CACHE_DIR=""`` turns it off), else
``$XDG_CACHE_HOME/remat`` (``~/.cache/remat``); ``remat.set_plan_cache_dir``
changes it for this process. On by default, unlike jax's compilation cache:
entries are a few KiB of JSON (executables are megabytes), and a search costs
several compiles. Files are written whole under a temporary name and renamed
into place, so concurrent writers leave one complete file; a file that cannot
be read or decoded is ignored with one ``PlanCacheWarning``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import threading
import warnings
from typing import Any

import jax

from remat._src.plans.plan import LayerCost, Plan, Segment
from remat._src.measure.profile import Profile

log = logging.getLogger("remat")

FORMAT = 2  # 2: Plan.segmenter renamed made_by
_UNSET = object()
_dir_override: Any = _UNSET
_warned: set[str] = set()
_lock = threading.Lock()


class PlanCacheWarning(UserWarning):
  """A plan cache file could not be read or written; remat planned without it."""


def set_plan_cache_dir(path: str | os.PathLike | None) -> None:
  """Where ``remat.fit``, ``budget`` and cost measurements keep their plans (``None``: nowhere).

  Overrides ``REMAT_CACHE_DIR`` for this process.

  Args:
    path: a directory (created when first written), or ``None`` to turn the cache off.

  Example:

    >>> import remat, tempfile
    >>> remat.set_plan_cache_dir(tempfile.mkdtemp())
    >>> remat.plan_cache_dir() is not None
    True
    >>> remat.set_plan_cache_dir(None); remat.plan_cache_dir() is None
    True
  """
  global _dir_override
  if path is not None and not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"`remat.set_plan_cache_dir` expects a directory path or None, but got {path!r}.")
  _dir_override = None if path is None or str(path) == "" else os.fspath(path)


def plan_cache_dir() -> str | None:
  """The plan cache directory in use, or ``None`` when the cache is off (see ``set_plan_cache_dir``)."""
  if _dir_override is not _UNSET:
    return _dir_override
  env = os.environ.get("REMAT_CACHE_DIR")
  if env is not None:
    return env or None
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "remat")


def environment() -> dict[str, Any]:
  """What besides the program decides a plan: software versions, backend and devices."""
  import jaxlib

  from remat._src.core import compile as compile_lib

  try:
    import flax
    flax_version = flax.__version__
  except ImportError:  # pragma: no cover - flax is a dependency
    flax_version = None
  from remat import __version__
  devices = jax.devices()
  return {"format": FORMAT, "remat": __version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "flax": flax_version, "backend": jax.default_backend(),
          "device_kind": devices[0].device_kind if devices else "", "devices": len(devices),
          "processes": jax.process_count(), "options": compile_lib.compiler_options()}


def key(kind: str, material: Any) -> tuple[str, str]:
  """``(file name, canonical text)`` of an entry: ``material`` and the environment, hashed."""
  text = json.dumps({"kind": kind, "env": environment(), "key": material}, sort_keys=True, default=repr)
  return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:40]}.json", text


def load(kind: str, material: Any) -> Any:
  """The cached value, or ``None`` (off, missing, unreadable or not this key)."""
  root = plan_cache_dir()
  if root is None:
    return None
  name, text = key(kind, material)
  path = os.path.join(root, name)
  try:
    with open(path, encoding="utf-8") as f:
      entry = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError, UnicodeDecodeError) as e:
    _warn(path, f"cannot be read ({type(e).__name__}: {e})")
    return None
  if not isinstance(entry, dict) or entry.get("key") != text or "value" not in entry:
    _warn(path, "is not an entry of this key (another remat version, or edited)")
    return None
  log.info("remat: plan cache hit: %s", path)
  return entry["value"]


def store(kind: str, material: Any, value: Any) -> None:
  """Writes an entry whole, then renames it into place (concurrent writers leave one whole file)."""
  root = plan_cache_dir()
  if root is None:
    return
  name, text = key(kind, material)
  path = os.path.join(root, name)
  try:
    os.makedirs(root, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=root)
    try:
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"key": text, "value": value}, f)
      os.replace(tmp, path)
    except BaseException:
      os.unlink(tmp)
      raise
  except OSError as e:
    _warn(path, f"cannot be written ({type(e).__name__}: {e})")
    return
  log.info("remat: plan cache stored: %s", path)


def warn_unusable(kind: str, material: Any, what: str) -> None:
  """Warns once that the entry of this key cannot be used (it is then planned again)."""
  root = plan_cache_dir()
  if root is not None:
    _warn(os.path.join(root, key(kind, material)[0]), what)


def _warn(path: str, what: str) -> None:
  with _lock:
    if path in _warned:
      return
    _warned.add(path)
  warnings.warn(f"remat: the plan cache file {path} {what}; planning without it. Delete the file, set "
                "REMAT_CACHE_DIR to another directory, or turn the cache off with REMAT_CACHE_DIR=\"\" "
                "(or `remat.set_plan_cache_dir(None)`).", PlanCacheWarning, stacklevel=3)


### Encoding (JSON: nothing is executed on reading)


def encode_segment(s: Segment) -> list:
  return [s.start, s.stop, [encode_segment(c) for c in s.children], s.checkpoint, s.offload, s.policy]


def decode_segment(v: list) -> Segment:
  start, stop, children, checkpoint, offload, policy = v
  return Segment(int(start), int(stop), tuple(decode_segment(c) for c in children), bool(checkpoint),
                 bool(offload), policy)


def encode_plan(p: Plan) -> dict:
  d = dataclasses.asdict(p)
  d["root"] = encode_segment(p.root)
  d["layer_evaluations"] = list(p.layer_evaluations)
  return d


def decode_plan(d: dict) -> Plan:
  d = dict(d)
  d["root"] = decode_segment(d["root"])
  d["layer_evaluations"] = tuple(int(v) for v in d["layer_evaluations"])
  return Plan(**d)


def encode_cost(c: LayerCost) -> dict:
  d = {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name != "policies"}
  d["policies"] = [[name, encode_cost(o)] for name, o in c.policies]
  return d


def decode_cost(d: dict) -> LayerCost:
  d = dict(d)
  d["policies"] = tuple((name, decode_cost(o)) for name, o in d["policies"])
  return LayerCost(**d)


def encode_profile(p: Profile) -> dict:
  return {f.name: getattr(p, f.name) for f in dataclasses.fields(p) if f.name != "hlo"}


def decode_profile(d: dict) -> Profile:
  return Profile(**d)
