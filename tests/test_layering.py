"""Library below, commands above (DESIGN.md contract 8): no library module imports a command module, and the import
graph of igdit (module-level and function-local imports alike) has no cycle."""
import ast
from pathlib import Path

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
    if path.name == "__init__.py":  # a package importing its own submodules is not a cycle of concern
        found = {t for t in found if not t.startswith(name + ".")}
    return found


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
