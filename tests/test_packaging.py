"""The installed package, not the source tree: build the wheel, install it (not editable) into a clean
virtual environment, import every module from it, and run the service from that environment alone.

The environment gets torch==2.13.0 first (the CPU build, as the README's set-up does), then the wheel
with its dependencies. Commands run from a scratch folder with a PATH that holds only that
environment's bin/ and the system's, so nothing can come from the checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from secdfd.common.service.local import free_ports

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("common", "dealer", "server_a", "server_b", "client")


def run(argv: list[str], timeout: float, **kw: object) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    assert res.returncode == 0, f"{' '.join(map(str, argv))} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


def source_modules() -> set[str]:
    out = set()
    for folder in FOLDERS:
        for p in (ROOT / folder).rglob("*.py"):
            parts = [x for x in p.relative_to(ROOT).with_suffix("").parts if x != "__init__"]
            out.add("secdfd." + ".".join(parts))
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        timeout=300)
    (whl,) = out.glob("secdfd-*.whl")
    return whl


def test_wheel_holds_every_module_and_the_embedded_model(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {n.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for n in names if n.endswith(".py")}
    assert source_modules() <= modules, sorted(source_modules() - modules)
    assert {"secdfd/common/ml/models/dfdnet-s.pt", "secdfd/common/ml/models/dfdnet-s.json",
            "secdfd/server_a/server.env", "secdfd/server_b/server.env"} <= names
    assert not any(n.startswith(("tests/", "examples/", "secdfd/tests")) for n in names)


def test_installed_wheel_imports_everything_and_serves(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(env_dir)], timeout=120)
    py = env_dir / "bin" / "python"
    run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], timeout=900)
    run([str(py), "-m", "pip", "install", "-q", str(wheel)], timeout=900)
    work = tmp_path / "work"  # not the checkout: nothing can be imported from the source tree
    work.mkdir()
    env = {"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp_path)),
           "SECDFD_THREADS": "1"}
    code = ("import importlib, json, secdfd.common, pathlib;"
            "mods = json.loads(open('mods.json').read());"
            "[importlib.import_module(m) for m in mods];"
            "print(pathlib.Path(secdfd.common.__file__).parent)")
    (work / "mods.json").write_text(json.dumps(sorted(source_modules())))
    where = run([str(py), "-c", code], timeout=300, cwd=work, env=env).stdout.strip()
    assert str(env_dir) in where, f"secdfd was imported from {where}, not from the clean environment"

    d, a, b, peer = free_ports(4)
    eps = ["--dealer", f"tcp://127.0.0.1:{d}", "--server-a", f"tcp://127.0.0.1:{a}",
           "--server-b", f"tcp://127.0.0.1:{b}", "--peer", f"tcp://127.0.0.1:{peer}"]
    state = work / "state"
    up = run(["secdfd", "up", "--state", str(state), *eps], timeout=900, cwd=work, env=env)
    try:
        assert "SecDFD is up" in up.stdout
        res = run(["secdfd-client", "detect", "--no-crop", str(ROOT / "examples" / "face.png"), "--json",
                   "--keys", str(state / "keys"), "--server-a", f"tcp://127.0.0.1:{a}",
                   "--server-b", f"tcp://127.0.0.1:{b}"], timeout=300, cwd=work, env=env)
        r = json.loads(res.stdout)
        assert r["verdict"] in ("real", "fake") and 0.0 <= r["p_fake"] <= 1.0 and r["rounds"] > 100
        plain = json.loads(run(["secdfd", "detect", "--no-crop", str(ROOT / "examples" / "face.png"), "--json"],
                               timeout=300, cwd=work, env=env).stdout)
        assert r["verdict"] == plain["verdict"] and abs(r["p_fake"] - plain["p_fake"]) <= 1e-3
    finally:
        down = subprocess.run(["secdfd", "down", "--state", str(state)], capture_output=True, text=True,
                              timeout=120, cwd=work, env=env)
    assert down.returncode == 0 and "stopped" in down.stdout
