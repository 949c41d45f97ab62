"""Data flows one way: io → network → pipeline → api → training → cli; nothing imports upward."""
import ast
from pathlib import Path

import unireg

ROOT = Path(unireg.__file__).parent
LAYERS = [  # lowest first; a module may import its own layer and the ones below
    ("base", ["errors", "organs", "organ_presence", "config", "preprocessing", "prompt", "hub", "io", "metrics",
              "similarity", "losses", "sampling", "memory"]),
    ("network", ["modeling"]),
    ("pipeline", ["pipeline", "registration_map", "result", "saved", "inverse", "visualize", "adapter"]),
    ("api", ["api", "data", "evaluation", "steering", "demo", "batch", "apply"]),
    ("training", ["training", "adapt"]),
    ("cli", ["cli"]),
]
RANK = {name: rank for rank, (_, names) in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "unireg" else ""


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
    return found


def test_every_module_has_a_layer():
    tops = {_top(_module_name(p)) for p in ROOT.rglob("*.py")} - {""}
    tops.discard("__init__")
    assert tops <= set(RANK), f"modules without a layer: {sorted(tops - set(RANK))}"


def test_no_import_goes_up_a_layer():
    upward = []
    for path in ROOT.rglob("*.py"):
        if path == ROOT / "__init__.py":
            continue  # the package front door re-exports the public API
        source = _top(_module_name(path))
        for module in _imports(path):
            target = _top(module) if module.startswith("unireg.") else ""
            if target and target in RANK and RANK[target] > RANK[source]:
                upward.append(f"{_module_name(path)} imports {module}")
    assert not upward, "\n".join(sorted(upward))
