"""remat/_src is grouped by layer, and imports run one way: a module imports only its own layer and
the layers below it, with no import cycle (function-level imports included)."""

import ast
import pathlib

SRC = pathlib.Path(__file__).parent.parent / "remat" / "_src"
# Lowest first: each layer may import the ones before it.
LAYERS = ["util", "core", "plans", "measure", "fitting", "chains", "adapters", "cli"]


def modules() -> dict[str, tuple[str, set[str]]]:
  """``layer.module`` -> (layer, the ``layer.module`` names it imports from remat._src)."""
  out = {}
  for path in SRC.glob("*/*.py"):
    if path.name == "__init__.py":
      continue
    layer, name = path.parent.name, path.stem
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("remat._src."):
        parts = node.module.split(".")
        if len(parts) == 3:  # from remat._src.layer import module
          imported |= {f"{parts[2]}.{a.name}" for a in node.names}
        else:  # from remat._src.layer.module import name
          imported.add(f"{parts[2]}.{parts[3]}")
    out[f"{layer}.{name}"] = (layer, imported)
  return out


def test_every_module_lives_in_a_layer_folder():
  assert not [p.name for p in SRC.glob("*.py") if p.name != "__init__.py"]
  assert sorted(p.name for p in SRC.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(LAYERS)


def test_imports_run_down_the_layers():
  mods = modules()
  wrong = [(m, dep) for m, (layer, deps) in mods.items() for dep in deps
           if LAYERS.index(dep.split(".")[0]) > LAYERS.index(layer)]
  assert not wrong, wrong
  assert all(dep in mods for _, deps in mods.values() for dep in deps)


def test_no_import_cycles():
  mods = modules()
  state: dict[str, int] = {}

  def visit(m, path):
    if state.get(m) == 1:
      raise AssertionError(f"import cycle: {' -> '.join(path + [m])}")
    if state.get(m) == 2:
      return
    state[m] = 1
    for dep in sorted(mods[m][1]):
      visit(dep, path + [m])
    state[m] = 2

  for m in sorted(mods):
    visit(m, [])
