"""The package's architecture holds: layers and contracts (import-linter, configured in pyproject.toml),
no import cycle between any two modules, and a command line that prints help without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

from reasondistill.stages import all_stages

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "reasondistill"
HEAVY = ("torch", "transformers", "datasets", "accelerate", "matplotlib", "vllm", "aiohttp", "math_verify")


def test_import_contracts_are_kept():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_every_top_level_module_has_a_layer():
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads TOML; the pinned suite runs 3.11")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    layered = {name.strip("()") for layer in layers for name in layer.split("|")}
    top_level = {
        f"reasondistill.{p.stem if p.is_file() else p.name}"
        for p in PACKAGE.iterdir()
        if (p.suffix == ".py" and p.stem != "__init__" and p.stem != "__main__")
        or (p / "__init__.py").exists()
    }
    assert top_level - layered == set()


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a cycle or a knot of them."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycles_between_modules():
    """Function-level imports count: a cycle through one is still a cycle (grimp reads them all)."""
    assert _cycles(grimp.build_graph("reasondistill")) == []


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    package = tmp_path / "knot"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from . import b\n")
    (package / "b.py").write_text("def f():\n    from . import a\n")
    (package / "c.py").write_text("from . import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _cycles(grimp.build_graph("knot")) == [["knot.a", "knot.b"]]


@pytest.mark.parametrize("command", [[], *[[name] for name in all_stages()], ["run"]])
def test_help_imports_no_heavy_library(command):
    """`reasondistill --help` and every `<stage> --help` print without importing torch & co (they take
    seconds to import; a stage imports them when it runs)."""
    code = (
        "import sys\n"
        "from reasondistill.cli import main\n"
        "try:\n"
        f"    main([*{command!r}, '--help'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code in (0, None), exit.code\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"
