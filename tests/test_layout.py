"""The package layout draws the architecture: each part of rlft imports only parts below it.

Read bottom-up, a newcomer meets the layers in the order they build on each other (docs/design.md):
helpers, meshes, experiment configs, models, data, generation, objectives, training, the public
`rlft.load`, the RL path, evaluation, experiment recipes, the command line.
"""

import ast
import pathlib

RLFT = pathlib.Path(__file__).resolve().parent.parent / "rlft"

LAYERS = [
    {"errors"},
    {"files", "ops", "host", "registry"},  # helpers that know nothing else
    {"parallel"},
    {"config"},
    {"models"},
    {"data"},
    {"generate"},
    {"objectives"},
    {"train"},
    {"api"},  # rlft.load / rlft.Model (`import rlft` counts as this)
    {"rl"},
    {"eval"},
    {"recipes"},
    {"cli"},
    {"__init__", "__main__"},
]
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def _part(module: str) -> str:
    """rlft.rl.stage -> rl; rlft.api -> api; rlft -> api (the package's public names)."""
    return module.split(".")[1] if "." in module else "api"


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) of every rlft import in the file, function-local ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rlft":
            names = [node.module] if node.module != "rlft" else [f"rlft.{a.name}" for a in node.names]
            out += [(node.lineno, n) for n in names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "rlft"]
    return out


def test_every_module_belongs_to_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in RLFT.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert parts == set(RANK), parts ^ set(RANK)


def test_each_layer_imports_only_layers_below_it():
    wrong = []
    for path in sorted(RLFT.rglob("*.py")):
        relative = path.relative_to(RLFT)
        part = relative.parts[0].removesuffix(".py")
        for line, module in _imports(path):
            target = _part(module) if module != "rlft" else "api"
            if target != part and RANK[target] >= RANK[part]:
                wrong.append(f"rlft/{relative}:{line} ({part}) imports {module} ({target})")
    assert not wrong, "\n".join(wrong)
