"""The layering the design promises, checked: imports point one way, and the root CLI is lazy.

`deploy` and `adapters` never import `lcserve.serving`; the core imports no group at module
import time; `lcserve --help` loads none of the heavy libraries (each fresh interpreter below
starts with nothing imported, so a leak cannot hide behind another test's imports).
"""

import ast
import json
import subprocess
import sys
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
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            else:
                names.add(node.module)
    return names


def package_of(path: Path) -> str:
    folder = path.parent.relative_to(ROOT).parts
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
