"""The layering the design promises, checked: imports point one way, and the root CLI is lazy.

`deploy` and `adapters` never import `lcserve.serving`; the core imports no group at module
import time; no module imports itself back through others (lazy imports count too); `lcserve
--help` loads none of the heavy libraries (each fresh interpreter below starts with nothing
imported, so a leak cannot hide behind another test's imports); the wheel ships no test support.
"""

import ast
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GROUPS = {"adapters": "lcserve.adapters", "deploy": "lcserve.deploy", "serving": "lcserve.serving"}
HEAVY = ("aiohttp", "matplotlib", "vllm", "torch")


def imported_modules(path: Path, package: str, top_level_only: bool) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved against `package`)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(from_module(node, package))
    return names


def from_module(node: ast.ImportFrom, package: str) -> str:
    """The absolute name of the module a `from ... import` reads (relative to `package` when relative)."""
    if not node.level:
        return node.module
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def package_of(path: Path, root: Path = ROOT) -> str:
    folder = path.parent.relative_to(root).parts
    top = GROUPS.get(folder[0], "lcserve")
    return ".".join([top, *folder[1:]])


def offenders(folders: tuple[str, ...], forbidden: tuple[str, ...], top_level_only: bool) -> list[str]:
    found = []
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name in imported_modules(path, package_of(path), top_level_only):
                if name.startswith(forbidden):
                    found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


def test_deploy_and_adapters_never_import_serving():
    assert offenders(("deploy", "adapters"), ("lcserve.serving",), top_level_only=False) == []


def test_adapters_never_import_deploy():
    assert offenders(("adapters",), ("lcserve.deploy",), top_level_only=False) == []


def test_core_imports_no_group_at_module_import_time():
    assert offenders(("lcserve",), tuple(GROUPS.values()), top_level_only=True) == []


def test_the_checks_can_fail(tmp_path, monkeypatch):
    """A serving import planted in a deploy-like file is found."""
    planted = ROOT / "deploy" / "_planted_for_test.py"
    planted.write_text("def f():\n    from lcserve.serving import gateway\n")
    try:
        assert offenders(("deploy",), ("lcserve.serving",), top_level_only=False) == [
            "deploy/_planted_for_test.py imports lcserve.serving"
        ]
    finally:
        planted.unlink()


def modules_after(*args: str) -> set[str]:
    code = (
        "import sys, json\nfrom lcserve.cli import cli\n"
        "try:\n    cli(list(sys.argv[1:]), prog_name='lcserve', standalone_mode=False)\nexcept SystemExit:\n    pass\n"
        "print(json.dumps(sorted(sys.modules)), file=sys.stderr)"
    )
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    return set(json.loads(r.stderr.strip().splitlines()[-1]))


@pytest.mark.parametrize("args", [("--help",), ("--version",), ("deploy", "--help"), ("adapters", "--help")])
def test_help_imports_no_heavy_library(args):
    loaded = modules_after(*args)
    assert [m for m in HEAVY if m in loaded] == []


def test_the_heavy_import_check_can_fail():
    """`serve --help` loads the serving group, which imports aiohttp: the check sees it."""
    assert "aiohttp" in modules_after("serve", "--help")


# --- no import circle: the graph of lcserve's own modules, every import counted (lazy ones too) ---


def module_name(path: Path, root: Path) -> str:
    package = package_of(path, root)
    return package if path.name == "__init__.py" else f"{package}.{path.stem}"


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the lcserve modules it imports, at module level or inside functions."""
    paths = {module_name(p, root): p for folder in ("lcserve", *GROUPS) for p in sorted((root / folder).rglob("*.py"))}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                module = from_module(node, package)
                submodules = {f"{module}.{a.name}" for a in node.names} & set(paths)
                # `from pkg import sub` reads the submodule, not pkg's own code (already imported as a parent)
                targets |= submodules | ({module} if len(submodules) < len(node.names) else set())
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_no_import_circle():
    graph = import_graph()
    assert "lcserve.model_facts" in graph["lcserve.model_config"]  # the graph sees imports at all
    assert import_circles(graph) == []


def test_the_circle_check_can_fail(tmp_path):
    """In a copy of the sources, a lazy import of rope_check in model_facts (the kind of circle
    model_config and rope_check had) is found, with both modules on it."""
    for folder in ("lcserve", *GROUPS):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    before = import_circles(import_graph(tmp_path))
    facts = tmp_path / "lcserve" / "model_facts.py"
    facts.write_text(facts.read_text() + "\n\ndef _planted():\n    from .rope_check import recorded_base\n")
    new = [c for c in import_circles(import_graph(tmp_path)) if c not in before]
    assert new == [["lcserve.model_facts", "lcserve.rope_check"]]


# --- size: functions and modules small enough to read whole (data tables exempt) ---

MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500


def table_lines(tree: ast.Module) -> int:
    """Lines of module-level data tables: an assignment whose value is a literal dict, list, tuple or set."""
    tables = (ast.Dict, ast.List, ast.Tuple, ast.Set)
    return sum(
        node.end_lineno - node.lineno + 1
        for node in tree.body
        if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, tables)
    )


def size_offenders(
    folders: tuple[str, ...],
    root: Path = ROOT,
    max_function: int = MAX_FUNCTION_LINES,
    max_module: int = MAX_MODULE_LINES,
) -> list[str]:
    """Every function (methods included) over max_function lines and every module over max_module
    lines, data tables not counted, each with its size."""
    found = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            text, name = path.read_text(), path.relative_to(root)
            tree = ast.parse(text)
            lines = len(text.splitlines()) - table_lines(tree)
            if lines > max_module:
                found.append(f"{name}: {lines} lines, data tables aside (limit {max_module})")
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = node.end_lineno - node.lineno + 1
                    if length > max_function:
                        found.append(f"{name}:{node.lineno} {node.name}: {length} lines (limit {max_function})")
    return found


def test_functions_and_modules_stay_small():
    found = size_offenders(("lcserve", *GROUPS))
    assert not found, "too long; split into named steps or modules:\n" + "\n".join(found)


# --- the wheel: what `pip wheel` builds from the project files, without test support ---

SUPPORT = ROOT / "tests" / "support"


def source_copy(dest: Path) -> Path:
    """The files a wheel is built from (the packages, test support beside them, pyproject, README)."""
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for folder in ("lcserve", *GROUPS, "tests/support"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=skip)
    for name in ("pyproject.toml", "README.md", "tests/__init__.py"):
        shutil.copy(ROOT / name, dest / name)
    return dest


def wheel_files(source: Path, out: Path) -> list[str]:
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), "."]
    subprocess.run(command, cwd=source, check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("*.whl")
    return zipfile.ZipFile(wheel).namelist()


def support_entries(names: list[str]) -> list[str]:
    """Wheel entries that are test support: anything under tests/, or a module of tests/support/."""
    support = {p.name for p in SUPPORT.glob("*.py") if p.name != "__init__.py"}
    return [n for n in names if n.startswith("tests/") or (n.endswith(".py") and Path(n).name in support)]


def test_the_wheel_ships_no_test_support(tmp_path):
    names = wheel_files(source_copy(tmp_path / "src"), tmp_path / "wheel")
    assert {"lcserve/model_facts.py", "lcserve/deploy/profiles/h100-80gb.yaml"} <= set(names)
    assert support_entries(names) == []


def test_the_wheel_check_can_fail(tmp_path):
    """The tiny models back where they were (lcserve/tiny_models.py) are found in the wheel."""
    source = source_copy(tmp_path / "src")
    shutil.copy(SUPPORT / "tiny_models.py", source / "lcserve" / "tiny_models.py")
    assert support_entries(wheel_files(source, tmp_path / "wheel")) == ["lcserve/tiny_models.py"]
