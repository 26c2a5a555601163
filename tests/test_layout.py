"""The house rules that a reader cannot see from one file: the wings' import rule
(docs/architecture.md, "The import rule") and who may import test code. Reads sources only."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Bottom to top: a module imports from its own wing and from wings to its left.
LAYERS = ("leaves", "config", "engines", "memory", "placement", "cluster", "schedule", "observe",
          "http", "ui", "entries")
LEAVES = {"errors", "redact", "files", "systemd", "__init__"}  # __init__: the version
ENTRIES = {"app", "cli", "litellm", "__main__"}
# The two known exceptions (docs/architecture.md): modules that import nothing of swapd's.
EXCEPTIONS = {
    ("placement.types", "schedule.phase"),
    ("placement.by_memory", "schedule.phase"),
    ("config.types", "placement.matrix"),
    ("config.routing", "placement.matrix"),
}


def _wing(module: str) -> str:
    """`config.loader` -> config; `errors` -> leaves; `app` -> entries."""
    head = module.split(".", 1)[0]
    if head in LEAVES:
        return "leaves"
    if head in ENTRIES:
        return "entries"
    assert head in LAYERS, f"swapd/{head}: a module outside every wing"
    return head


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_each_wing_imports_only_the_wings_below_it() -> None:
    wrong = []
    for path in sorted((ROOT / "swapd").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT / "swapd").with_suffix("").parts)
        module = module.removesuffix(".__init__") if module != "__init__" else module
        mine = _wing(module)
        for target in _imports(path):
            if not target.startswith("swapd.") or target == "swapd":
                continue
            name = target.removeprefix("swapd.")
            if not (ROOT / "swapd" / name.replace(".", "/")).with_suffix(".py").exists() and \
                    not (ROOT / "swapd" / name.replace(".", "/")).is_dir():
                # `from swapd.x import y`: y is a name in x (in swapd/__init__.py: no dot)
                name = name.rsplit(".", 1)[0] if "." in name else "__init__"
            theirs = _wing(name)
            if LAYERS.index(theirs) > LAYERS.index(mine) and (module, name) not in EXCEPTIONS:
                wrong.append(f"{module} ({mine}) imports {name} ({theirs})")
    assert wrong == []


def test_no_file_imports_a_test_file_or_the_conftest() -> None:
    """Shared helpers live in tests/support: tests, bench/ and scripts/ import them from
    there, never from tests/conftest.py or from another test file."""
    wrong = []
    for folder in ("tests", "bench", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for target in _imports(path):
                parts = target.split(".")
                if parts[0] == "tests" and len(parts) > 1 and (
                        parts[1] == "conftest" or parts[1].startswith("test_")):
                    wrong.append(f"{path.relative_to(ROOT)} imports {target}")
    assert wrong == []
