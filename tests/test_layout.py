"""The layout's rules, read from the source: imports only go down, click lives at the edges.

Layers of `secdfd.common` (see its package docstring), bottom to top:
errors/roster < engine < net < ml < service < bench < cli. A module may import its own layer and
the layers its row lists. The deployment folders (dealer, server_a, server_b, client) sit on top;
they import `common`, never each other, and `common` never imports them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("common", "dealer", "server_a", "server_b", "client")

# layer -> the layers it may import (besides its own)
ALLOWED: dict[str, set[str]] = {
    "base": set(),
    "engine": {"base"},
    "net": {"base", "engine"},
    "ml": {"base"},
    "service": {"base", "engine", "net", "ml"},
    "bench": {"base", "engine", "net", "ml", "service"},
    "cli": {"base", "engine", "net", "ml", "service", "bench"},
    "dealer": {"base", "engine", "net", "ml", "service", "cli"},
    "server_a": {"base", "engine", "net", "ml", "service", "cli"},
    "server_b": {"base", "engine", "net", "ml", "service", "cli"},
    "client": {"base", "engine", "net", "ml", "service", "cli"},
}
CLICK_LAYERS = {"cli", "dealer", "server_a", "server_b", "client"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return "secdfd." + ".".join(parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[1] != "common":
        return parts[1]
    if len(parts) == 2 or parts[2] in ("errors", "roster"):
        return "base"
    return parts[2]


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, at any depth (function-level imports too)."""
    out = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}:{node.lineno}: relative import; use secdfd.* absolute imports")
            base = node.module or ""
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names if base in ("secdfd", "secdfd.common")]
    return out


def sources() -> list[Path]:
    return sorted(p for f in FOLDERS for p in (ROOT / f).rglob("*.py"))


def test_every_source_module_is_checked():
    names = {module_name(p) for p in sources()}
    assert {"secdfd.common.engine.plan", "secdfd.common.net.transport", "secdfd.server_a.leader",
            "secdfd.client.main"} <= names
    assert len(names) > 60


def test_imports_only_go_down():
    bad = []
    for path in sources():
        mine = layer(module_name(path))
        for line, mod in imports(path):
            if not mod.startswith("secdfd.") or mod in ("secdfd.common",):
                continue
            theirs = layer(mod)
            if theirs != mine and theirs not in ALLOWED[mine]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {mine} imports {mod} ({theirs})")
    assert not bad, "imports that go up or sideways:\n" + "\n".join(bad)


def test_click_only_at_the_edges():
    bad = [f"{p.relative_to(ROOT)}:{line}" for p in sources() for line, mod in imports(p)
           if mod.split(".")[0] == "click" and layer(module_name(p)) not in CLICK_LAYERS]
    assert not bad, "click outside cli/ and the entry points: " + ", ".join(bad)


def test_every_package_says_what_it_may_import():
    for init in (ROOT / "common").rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        if init.parent.name in ("protocols", "models"):
            continue  # parts of the engine and of ml, under their parent's rule
        assert "import" in doc.lower(), f"{init.relative_to(ROOT)} does not say what it may import"


def test_the_rule_catches_an_upward_import():
    assert layer("secdfd.common.service.server") == "service"
    assert "service" not in ALLOWED["engine"] and "client" not in ALLOWED["bench"]
    assert layer("secdfd.common.roster") == "base" and layer("secdfd.client.main") == "client"
