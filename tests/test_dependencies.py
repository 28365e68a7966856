"""Every third-party package igdit imports is declared in pyproject.toml, and the torch floor is what the code needs."""
import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> dict[str, str]:
    """{canonical distribution name: requirement} of the dependencies and every extra."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return {_canonical(re.match(r"[A-Za-z0-9_.-]+", r).group(0)): r for r in requirements}


def _imported() -> dict[str, set[str]]:
    """{top-level module: files importing it} of every absolute import in igdit/, the standard library excluded."""
    found: dict[str, set[str]] = {}
    for path in (REPO / "igdit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "igdit" and top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_imported_package_is_declared():
    declared, distributions = _declared(), packages_distributions()
    missing = {}
    for module, files in sorted(_imported().items()):
        candidates = {_canonical(d) for d in distributions.get(module, [module])}
        if not candidates & set(declared):
            missing[module] = sorted(files)[:3]
    assert missing == {}, f"imported but not declared in pyproject.toml: {missing}"


def test_the_declared_torch_floor_has_what_the_code_imports():
    declared = _declared()
    floor = re.search(r">=\s*([0-9.]+)", declared["torch"]).group(1)
    uses_muon = any("torch.optim._muon" in p.read_text() for p in (REPO / "igdit").rglob("*.py"))
    assert uses_muon and tuple(int(x) for x in floor.split(".")[:2]) >= (2, 9), declared["torch"]
    import torch.optim._muon  # noqa: F401 (the environment the suite runs in has it too)


def test_no_user_facing_text_names_the_retired_huggingface_cli():
    texts = [REPO / "README.md", *(REPO / "igdit").rglob("*.py")]
    assert [str(p.relative_to(REPO)) for p in texts if "huggingface-cli" in p.read_text()] == []
