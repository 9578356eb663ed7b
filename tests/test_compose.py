"""docker-compose.yml run without Docker: each service's command and environment as a local process.

The translation is the only thing this test adds: service hostnames and 0.0.0.0 become 127.0.0.1
on a free port per (service, port), container paths become folders under a scratch directory
according to each service's volumes, and the console scripts come from this interpreter's
environment. Everything else (commands, environment, env files, which files each service sees)
is read from the compose files, so they cannot drift apart from the code.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import write_tiny_model

from secdfd.common.service import local

pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PARTIES = ("dealer", "server_a", "server_b")


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / name).read_text())


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR:-default} and ${VAR} substitution."""
    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(3) or ""
        return env.get(name) or default

    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", sub, value)


def env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k] = v
    return out


class Translate:
    """Container world -> this machine: addresses and paths."""

    def __init__(self, scratch: Path, compose_env: dict[str, str]) -> None:
        self.scratch = scratch
        self.compose_env = compose_env
        self.ports: dict[tuple[str, int], int] = {}

    def port(self, host: str, port: int) -> int:
        if (host, port) not in self.ports:
            self.ports[(host, port)] = local.free_ports(1)[0]
        return self.ports[(host, port)]

    def mounts(self, service: dict[str, Any]) -> list[tuple[str, Path]]:
        """(container path, host path) of each volume, longest container path first."""
        out = []
        for v in service.get("volumes", []):
            source, target = interpolate(v, self.compose_env).split(":")[:2]
            if source.startswith(("./", "/")):
                host = (ROOT / source).resolve() if source.startswith("./") else Path(source)
            else:  # a named volume
                host = self.scratch / "volumes" / source
                host.mkdir(parents=True, exist_ok=True)
            out.append((target, host))
        return sorted(out, key=lambda m: -len(m[0]))

    def value(self, text: str, service_name: str, service: dict[str, Any]) -> str:
        def addr(m: re.Match[str]) -> str:
            host, port = m.group(1), int(m.group(2))
            owner = service_name if host == "0.0.0.0" else host
            return f"tcp://127.0.0.1:{self.port(owner, port)}"

        text = re.sub(r"tcp://([\w.]+):(\d+)", addr, interpolate(text, self.compose_env))
        for target, host in self.mounts(service):
            text = re.sub(rf"(?<![\w/]){re.escape(target)}(?=/|\b|$)", str(host), text)
        return text

    def process(self, name: str, service: dict[str, Any], extra_env: dict[str, str] | None = None
                ) -> tuple[list[str], dict[str, str]]:
        env: dict[str, str] = {}
        if "env_file" in service:
            files = service["env_file"] if isinstance(service["env_file"], list) else [service["env_file"]]
            for f in files:
                env.update(env_file(ROOT / f))
        env.update({k: str(v) for k, v in (service.get("environment") or {}).items()})
        env.update(extra_env or {})
        env = {k: self.value(v, name, service) for k, v in env.items()}
        argv = [self.value(a, name, service) for a in service["command"]]
        if (BIN / argv[0]).exists():
            argv[0] = str(BIN / argv[0])  # the console scripts of this environment
        base = {k: v for k, v in os.environ.items() if not k.startswith("SECDFD_")}
        base["PATH"] = f"{BIN}{os.pathsep}{base.get('PATH', '')}"
        return argv, {**base, **env}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load("docker-compose.yml")


def test_compose_file_shape(compose):
    services = compose["services"]
    assert set(PARTIES) <= set(services)
    assert services["client"]["profiles"] == ["client"] and services["init"]["profiles"] == ["init"]
    for name in PARTIES:
        vols = services[name]["volumes"]
        # each party mounts only its own key folder, read-only, and keeps its ledger in a volume
        assert any(f"/keys/{name}:/keys/{name}:ro" in v for v in vols)
        assert any(v.startswith(f"{name}-state:") for v in vols) and f"{name}-state" in compose["volumes"]
    # host ports 7301 and 7302 unless SECDFD_PORT_A / SECDFD_PORT_B say otherwise
    ports = {name: [interpolate(p, {}) for p in services[name]["ports"]] for name in ("server_a", "server_b")}
    assert ports == {"server_a": ["7301:7301"], "server_b": ["7302:7302"]}
    docker = (ROOT / "Dockerfile").read_text()
    # the base image is a build argument (an offline base for air-gapped sites), python:3.11-slim by default
    assert docker.startswith("#") and "ARG BASE_IMAGE=python:3.11-slim" in docker and "FROM ${BASE_IMAGE}" in docker
    torch_line = docker.index("pip install torch==2.13.0 --index-url")
    assert "download.pytorch.org/whl/cpu" in docker and torch_line < docker.index("pip install .")


def test_gpu_override(compose, tmp_path):
    gpu = _load("docker-compose.gpu.yml")
    for name in ("server_a", "server_b"):
        svc = gpu["services"][name]
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and svc["environment"]["SECDFD_SERVER_DEVICE"] == "cuda"
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal below is for machines without")
    tr = Translate(tmp_path, {"SECDFD_DEPLOY": str(tmp_path / "deploy")})
    merged = {**compose["services"]["server_a"], "environment": {
        **compose["services"]["server_a"]["environment"], **gpu["services"]["server_a"]["environment"]}}
    argv, env = tr.process("server_a", merged)
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "CUDA is not available" in r.stderr and "Traceback" not in r.stderr


def _model(path: Path) -> Path:
    return write_tiny_model(path)


def test_compose_services_detect_as_local_processes(compose, tmp_path):
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    tr = Translate(tmp_path, {"SECDFD_DEPLOY": str(deploy), "SECDFD_IMAGES": str(ROOT / "examples")})
    services = compose["services"]

    # the init service: keys and weight shares (of a small test model instead of the embedded one)
    model = _model(deploy / "test-model.pt")
    argv, env = tr.process("init", services["init"], {"SECDFD_SHARE_MODEL": str(model)})
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (deploy / "shares" / "model.json").is_file() and (deploy / "keys" / "client").is_dir()

    started = []
    try:
        for name in PARTIES:
            argv, env = tr.process(name, services[name])
            log = tmp_path / "logs" / f"{name}.log"
            endpoint = f"tcp://127.0.0.1:{tr.ports.get((name, 7301 if name == 'server_a' else 7302), 0)}"
            launch = local.Launch(name, tuple(argv), {}, endpoint)
            log.parent.mkdir(exist_ok=True)
            with open(log, "ab") as f:
                proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            started.append(local.Started(launch, proc.pid, log, proc))
        local.wait_ready(started, deploy / "keys", timeout=240)

        argv, env = tr.process("client", services["client"])
        assert argv[-1] == str(ROOT / "examples" / "face.png")
        t0 = time.monotonic()
        r = subprocess.run([*argv, "--json"], env=env, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        assert '"verdict": "' in r.stdout and time.monotonic() - t0 < 120
        # the three processes are still serving
        assert all(s.alive() for s in started)
    finally:
        local.stop(started)
