"""Library below, commands above: no library module imports a command module; the import graph of igdit (module-level
and function-local imports alike, a package's ``__init__`` importing its own submodules included) has no cycle; and
the parts a sampler or a frozen network needs import without the training stack (Lightning, MLflow, Optuna)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "igdit"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found  # a package's __init__ importing its submodules counts: importing the package runs them


def test_library_modules_never_import_command_modules():
    modules = _modules()
    commands = {m for m in modules if m.startswith("igdit.commands") or m in ("igdit.cli", "igdit.__main__")}
    offenders = {m: sorted(_imports(m, p, modules) & commands) for m, p in modules.items() if m not in commands}
    assert {m: c for m, c in offenders.items() if c} == {}


def test_the_import_graph_has_no_cycle():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert len(graph) > 40  # the walk saw the package


def test_an_init_edge_closes_a_cycle(tmp_path):
    """The walk sees a cycle that runs through a package's __init__ (the kind that hid checkpoints -> module ->
    objectives/__init__ -> objectives.self_guided -> checkpoints)."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("import pkg.sub\n")
    (package / "sub" / "__init__.py").write_text("from pkg.sub.b import thing\n")
    (package / "sub" / "b.py").write_text("def thing():\n    from pkg import a\n")
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(tmp_path).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    assert "pkg.sub.b" in graph["pkg.sub"] and "pkg.a" in graph["pkg.sub.b"] and "pkg.sub" in graph["pkg.a"]


@pytest.mark.parametrize("module", ["igdit.guidance", "igdit.samplers", "igdit.models"])
def test_sampling_parts_import_without_the_training_stack(module):
    """A guide or a teacher loads as a backbone (igdit.models.load_backbone), so guidance, samplers and models never
    pull in Lightning, MLflow or Optuna (a fresh interpreter: nothing imported before)."""
    code = (f"import sys, {module}; heavy = [m for m in ('lightning', 'pytorch_lightning', 'mlflow', 'optuna') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("module", ["igdit.guidance", "igdit.samplers", "igdit.generation", "igdit.commands.sample"])
def test_the_guidance_rules_and_sample_command_import_without_the_models(module):
    """The networks (timm's layers, which import torchvision: over a second) load when a model is built or a guide is
    read, not when `igdit sample --help` builds its parser or a rule is named."""
    code = f"import sys, {module}; print([m for m in ('igdit.models', 'timm', 'torchvision') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
