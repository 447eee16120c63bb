"""The package's layers import downward only (DEVELOPERS.md, "Architecture").

Every ``import`` of a ``merlin_mllm`` module in the source tree, at module level or inside a
function, is parsed with ``ast`` (nothing is imported) and checked against the layer table:
a module may import its own layer and the layers below it, never one above. A new top-level
module must be given a layer here.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, List, Tuple

REPO = Path(__file__).resolve().parents[1]

#: Lowest first. A module belongs to the layer of the longest prefix that names it.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    ("base", ("merlin_mllm", "merlin_mllm.lazy_exports", "merlin_mllm.merlin_compat", "merlin_mllm.text",
              "merlin_mllm.image_loading", "merlin_mllm.metrics", "merlin_mllm.choices")),
    ("models", ("merlin_mllm.models", "merlin_mllm.generation")),
    ("data", ("merlin_mllm.data",)),
    ("summaries", ("merlin_mllm.summaries",)),
    ("ranker core", ("merlin_mllm.ranker",)),
    ("operators", ("merlin_mllm.operators",)),
    ("pipelines", ("merlin_mllm.pipelines", "merlin_mllm.baselines")),
    ("serving", ("merlin_mllm.serving",)),
    ("CLI and quickstart", ("merlin_mllm.cli", "merlin_mllm.quickstart", "merlin_mllm.reporting",
                            "merlin_mllm.doctor")),
]
LEVEL = {name: level for level, (name, _) in enumerate(LAYERS)}


def layer_of(module: str) -> str:
    best, found = -1, None
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), name
    if found is None:
        raise AssertionError(f"{module} has no layer: add it to LAYERS in {Path(__file__).name}")
    return found


def source_modules() -> Iterator[Tuple[str, Path]]:
    """(dotted name, file) of every module; ``operators/`` is imported as ``merlin_mllm.operators``."""
    for top, package in (("merlin_mllm", ("merlin_mllm",)), ("operators", ("merlin_mllm", "operators"))):
        for path in sorted((REPO / top).rglob("*.py")):
            parts = list(package) + list(path.relative_to(REPO / top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


def imported_modules(module: str, path: Path, known: set) -> Iterator[Tuple[str, int]]:
    """(imported ``merlin_mllm`` module, line) for every import statement of ``path``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                # ``from merlin_mllm.models import vision`` imports the submodule.
                sub = f"{base}.{alias.name}"
                yield (sub if sub in known else base), node.lineno


def upward_imports() -> List[str]:
    modules = dict(source_modules())
    known = set(modules)
    found = []
    for module, path in modules.items():
        mine = layer_of(module)
        for target, line in imported_modules(module, path, known):
            if target != "merlin_mllm" and not target.startswith("merlin_mllm."):
                continue
            theirs = layer_of(target)
            if LEVEL[theirs] > LEVEL[mine]:
                found.append(f"{path.relative_to(REPO)}:{line}: {module} ({mine}) imports {target} ({theirs})")
    return found


def test_every_module_has_a_layer():
    for module, _ in source_modules():
        layer_of(module)


def test_imports_only_go_down():
    assert upward_imports() == []


def test_the_layer_rules_of_the_issue():
    """Spelled out: serving never imports the pipelines; the ranker core never imports operators
    or pipelines; summaries know nothing of the ranker."""
    order = ["merlin_mllm.models.loading", "merlin_mllm.data.prepare", "merlin_mllm.summaries.rows",
             "merlin_mllm.ranker.prompt", "merlin_mllm.operators.tokenize_prompt", "merlin_mllm.pipelines.training",
             "merlin_mllm.serving.export", "merlin_mllm.cli"]
    levels = [LEVEL[layer_of(m)] for m in order]
    assert levels == sorted(set(levels)), levels
    modules = dict(source_modules())
    known = set(modules)
    rules = (("merlin_mllm.serving", ("merlin_mllm.pipelines",)),
             ("merlin_mllm.ranker", ("merlin_mllm.operators", "merlin_mllm.pipelines")),
             ("merlin_mllm.summaries", ("merlin_mllm.ranker", "merlin_mllm.operators", "merlin_mllm.pipelines")))
    for owner, forbidden in rules:
        for module, path in modules.items():
            if module != owner and not module.startswith(owner + "."):
                continue
            for target, line in imported_modules(module, path, known):
                assert not any(target == f or target.startswith(f + ".") for f in forbidden), \
                    f"{path.relative_to(REPO)}:{line}: {module} imports {target}"


def test_no_private_names_cross_modules():
    """``from merlin_mllm.x import _name`` is refused: a name another module needs is public."""
    found = []
    for module, path in source_modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("merlin_mllm")):
                found += [f"{path.relative_to(REPO)}:{node.lineno}: {alias.name}" for alias in node.names
                          if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert found == []


def test_the_check_sees_an_upward_import(tmp_path):
    """The parser finds imports inside functions and relative ones."""
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from merlin_mllm.pipelines.training import train_ranker\n"
                    "from ..operators import tokenize_prompt\n")
    known = {"merlin_mllm.operators.tokenize_prompt"}
    found = list(imported_modules("merlin_mllm.ranker.probe", path, known))
    assert ("merlin_mllm.pipelines.training", 2) in found
    assert ("merlin_mllm.operators.tokenize_prompt", 3) in found
    assert LEVEL[layer_of("merlin_mllm.pipelines.training")] > LEVEL[layer_of("merlin_mllm.ranker.probe")]
