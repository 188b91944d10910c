"""The package's layers (README, Layout): every import of an ssprompt module, at the top of a
file or inside a function, goes to the same layer or one listed before it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# prompts/ (SSPrompt's prompt sets) and methods/ (the protocol they fill, beside the peers)
# are one layer: a PromptSet is a MethodState, and the SSPrompt methods build PromptSets
LAYERS = ["errors", "io", "lru", "geometry", "distributed", "sfm", "data", ("prompts", "methods"),
          "evaluation", "engine", "predictor", "predict", "study", "pretraining", "api", "cli"]


def _imports(path: Path, module: list[str]):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            package = module if path.name == "__init__.py" else module[:-1]
            base = package[:len(package) - node.level + 1]
            yield base + (node.module.split(".") if node.module else [])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ssprompt"):
            yield node.module.split(".")
        elif isinstance(node, ast.Import):
            yield from (a.name.split(".") for a in node.names if a.name.startswith("ssprompt"))


def _ranks() -> dict[str, int]:
    return {name: i for i, layer in enumerate(LAYERS)
            for name in (layer if isinstance(layer, tuple) else (layer,))}


def test_imports_only_go_down_the_layers():
    rank = _ranks()
    up, seen = [], 0
    for path in (ROOT / "ssprompt").rglob("*.py"):
        module = list(path.relative_to(ROOT).with_suffix("").parts)
        if len(module) < 2 or module[1] not in rank:
            continue
        for target in _imports(path, module):
            if len(target) > 1 and target[1] in rank:
                seen += 1
                if rank[target[1]] > rank[module[1]]:
                    up.append(f"{'.'.join(module)} -> {'.'.join(target)}")
    assert seen > 100 and up == []


def test_every_package_module_is_in_a_layer():
    tops = {p.stem if p.is_file() else p.name for p in (ROOT / "ssprompt").iterdir()
            if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert tops - {"__init__", "__main__"} <= set(_ranks())
