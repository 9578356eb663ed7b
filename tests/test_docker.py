"""docker-compose.yml on a real Docker engine: build, init, serve, detect, lose server_b, tear down.

Everything goes through command-line tools: docker, docker compose (or docker-compose 1.29), the
scripts/docker_offline.sh helper, and the `secdfd` / `secdfd-client` console scripts of this
interpreter's environment. No container registry or package index is needed inside the build: the
base image is made from Debian's archive (debootstrap) and the wheels with `pip download` on this
host, both kept in SECDFD_DOCKER_CACHE (default ~/.cache/secdfd-docker) with the images, so a second
run rebuilds nothing. Where no engine answers, the test installs docker.io, docker-compose and
debootstrap (apt) if they are missing and starts dockerd, as root; it stops what it started. It is
skipped only where no engine answers and none can be started (not root).

The deployment lives in a fresh folder under the temporary directory and a compose project of its
own, on free host ports; its containers, network and volumes are removed at the end (also on
failure). The image (secdfd:docker-test) and the base image stay cached.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import assert_failed_record

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CACHE = Path(os.environ.get("SECDFD_DOCKER_CACHE") or Path.home() / ".cache" / "secdfd-docker")
BASE_IMAGE = "secdfd-base:bookworm"
IMAGE = "secdfd:docker-test"
IMAGE_UID = 10001  # the image's user (Dockerfile)
FACE = "examples/face.png"
PARTIES = ("dealer", "server_a", "server_b")
# Bundles each server keeps ready (server.env: 4). Each costs the dealer and the servers seconds of
# CPU in the background, and a restarted server_b skips those its peer still holds; on 2 shared cores
# the test keeps one (SECDFD_TEST_DEPTH, empty for server.env's own).
DEPTH = os.environ.get("SECDFD_TEST_DEPTH", "1")
DEPTH_FILE = "docker-compose.test-depth.yml"

pytestmark = pytest.mark.docker


def log(msg: str) -> None:
    print(f"[docker] {msg}", flush=True)


def sh(argv: Sequence[Any], timeout: float, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    argv = [str(a) for a in argv]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{' '.join(argv)} did not finish within {timeout:g} s:\n{e.stdout}\n{e.stderr}") from None
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {r.returncode}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any SECDFD_* setting of the caller's, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECDFD_")}
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the engine --------------------------------------------------------------------------------


def engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return sh(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=60, check=False).returncode == 0


def compose_command() -> list[str] | None:
    """`docker compose` (v2) where the plugin is there, else docker-compose (1.29); None if neither."""
    if shutil.which("docker") and sh(["docker", "compose", "version"], timeout=60, check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def apt_install(packages: list[str]) -> None:
    if not packages:
        return
    if shutil.which("apt-get") is None:
        raise AssertionError(f"cannot install {', '.join(packages)}: no apt-get on this machine")
    env = clean_env(DEBIAN_FRONTEND="noninteractive")
    t0 = time.monotonic()
    sh(["apt-get", "update", "-q"], timeout=300, env=env)
    sh(["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages], timeout=600, env=env)
    log(f"installed {' '.join(packages)} in {time.monotonic() - t0:.0f} s")


def missing_tools(daemon: bool) -> list[str]:
    wanted = {"docker": "docker.io", "debootstrap": "debootstrap"} | ({"dockerd": "docker.io"} if daemon else {})
    packages = {pkg for tool, pkg in wanted.items() if shutil.which(tool) is None}
    if compose_command() is None:
        packages.add("docker-compose")
    return sorted(packages)


def start_dockerd(work: Path) -> subprocess.Popen[bytes]:
    """dockerd as root with its default storage driver, else vfs; waits until it answers."""
    for extra in ([], ["--storage-driver", "vfs"]):
        logfile = work / "dockerd.log"
        with open(logfile, "ab") as f:
            proc = subprocess.Popen(["dockerd", *extra], stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if engine_answers():
                log(f"started dockerd {' '.join(extra)} (pid {proc.pid}, log {logfile})")
                return proc
            time.sleep(1)
        stop_dockerd(proc)
        log(f"dockerd {' '.join(extra)} did not come up: {logfile.read_text()[-1500:]}")
    raise AssertionError(f"could not start dockerd; see {work / 'dockerd.log'}")


def stop_dockerd(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@dataclass
class Engine:
    compose: list[str]


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """A fresh folder that the containers' user can reach (pytest's own tmp folders are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="secdfd-docker-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    started = None
    if not engine_answers():
        if os.geteuid() != 0:
            pytest.skip("no Docker engine answers here and this user (not root) cannot start one")
        apt_install(missing_tools(daemon=True))
        if not engine_answers():  # where a service manager runs, installing docker.io starts one
            CACHE.mkdir(parents=True, exist_ok=True)
            started = start_dockerd(CACHE)
    else:
        apt_install(missing_tools(daemon=False) if os.geteuid() == 0 else [])
    try:
        compose = compose_command()
        if compose is None:
            pytest.skip("neither `docker compose` nor docker-compose is installed, and this user cannot install them")
        log(f"engine {sh(['docker', 'info', '--format', '{{.ServerVersion}} {{.Driver}}'], timeout=60).stdout.strip()}"
            f", compose: {' '.join(compose)}")
        yield Engine(compose)
    finally:
        if started is not None:
            stop_dockerd(started)
            log("stopped the dockerd this test started")


# --- the image ---------------------------------------------------------------------------------


@dataclass
class Built:
    context: Path
    seconds: dict[str, float]
    size: int


def copy_context(dest: Path) -> None:
    """The project as a build context and compose folder of its own (hard links where possible)."""
    skip = shutil.ignore_patterns(".git", ".venv", ".secdfd", "__pycache__", "*.egg-info", ".mypy_cache",
                                  ".pytest_cache", ".ruff_cache", "build", "dist", "runs", "perf", "wheels")

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(ROOT, dest, ignore=skip, copy_function=link)


@pytest.fixture(scope="module")
def built(engine: Engine, scratch: Path) -> Built:
    seconds: dict[str, float] = {}
    script = ROOT / "scripts" / "docker_offline.sh"
    env = clean_env(SECDFD_DOCKER_CACHE=str(CACHE), PYTHON=sys.executable,
                    SECDFD_TORCH_INDEX=os.environ.get("SECDFD_TORCH_INDEX", ""))
    t0 = time.monotonic()
    r = sh(["bash", script, "base", BASE_IMAGE], timeout=600, env=env)
    seconds["base"] = time.monotonic() - t0
    log(f"{r.stdout.strip()} ({seconds['base']:.0f} s)")

    t0 = time.monotonic()
    wheels = CACHE / "wheels"
    r = sh(["bash", script, "wheels", wheels], timeout=600, env=env)
    seconds["wheels"] = time.monotonic() - t0
    log(f"{r.stdout.strip()} ({seconds['wheels']:.0f} s)")
    torch_wheels = [p.name for p in wheels.glob("torch-2.13.0*.whl")]
    assert any("+cpu" in n for n in torch_wheels), (
        f"{wheels} holds {torch_wheels}, not the CPU build of torch 2.13.0: set "
        "SECDFD_TORCH_INDEX=https://download.pytorch.org/whl/cpu, remove the folder and run again")

    context = scratch / "project"
    copy_context(context)
    shutil.copytree(wheels, context / "wheels", copy_function=os.link if _same_fs(wheels, context) else shutil.copy2)
    t0 = time.monotonic()
    # what DOCKER_README_DRAFT.md tells an air-gapped site to run (with this test's tag): no network at all
    sh(["docker", "build", "--network", "none", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--build-arg",
        "WHEELS=wheels", "-t", IMAGE, "."], timeout=1200, cwd=context)
    seconds["build"] = time.monotonic() - t0
    shutil.rmtree(context / "wheels")
    size = int(sh(["docker", "image", "inspect", "-f", "{{.Size}}", IMAGE], timeout=60).stdout)
    log(f"built {IMAGE} in {seconds['build']:.0f} s: {size / 1e6:.0f} MB")
    return Built(context, seconds, size)


def _same_fs(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


# --- the deployment ----------------------------------------------------------------------------


@dataclass
class Deployment:
    compose: list[str]
    project: str
    context: Path
    deploy: Path
    env: dict[str, str]
    uid: int
    gid: int
    ports: tuple[int, int]
    plain: dict[str, Any]
    last_bundle: int = -1
    seconds: dict[str, float] = field(default_factory=dict)
    cids: dict[str, str] = field(default_factory=dict)
    as_owner: list[str] = field(default_factory=list)  # the prefix that runs a host command as the keys' owner

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        files = ["-f", "docker-compose.yml"] + (["-f", DEPTH_FILE] if (self.context / DEPTH_FILE).exists() else [])
        return sh([*self.compose, *files, "-p", self.project, *args], timeout=timeout, check=check, cwd=self.context,
                  env=self.env)

    def container(self, service: str) -> str:
        """The service's container id (the same container across restarts, so asked once)."""
        if service not in self.cids:
            cid = self.run("ps", "-q", service, timeout=60).stdout.strip()
            assert cid, f"no container for {service}"
            self.cids[service] = cid
        return self.cids[service]

    def inspect(self, cid: str) -> dict[str, Any]:
        return json.loads(sh(["docker", "inspect", cid], timeout=60).stdout)[0]

    def ready_lines(self, service: str) -> int:
        r = sh(["docker", "logs", self.container(service)], timeout=60)
        return (r.stdout + r.stderr).count(f"{service} ready on ")

    def wait_ready(self, counts: dict[str, int], timeout: float = 240) -> None:
        """Until each service has logged `ready on` more often than `counts` says."""
        deadline = time.monotonic() + timeout
        while True:
            if all(self.ready_lines(s) > n for s, n in counts.items()):
                return
            if time.monotonic() > deadline:
                logs = self.run("logs", "--tail", "20", *counts, check=False)
                raise AssertionError(f"{', '.join(counts)} not ready within {timeout:g} s:\n{logs.stdout}{logs.stderr}")
            time.sleep(1)

    def client_argv(self, *args: str, timeout: float = 120) -> list[str]:
        """secdfd-client on this host, as the user that owns the keys (setpriv when this is root)."""
        argv = [str(BIN / "secdfd-client"), "detect", "--no-crop", *args, "--json", "--timeout", f"{timeout:g}",
                "--keys", str(self.deploy / "keys" / "client"),
                "--server-a", f"tcp://127.0.0.1:{self.ports[0]}", "--server-b", f"tcp://127.0.0.1:{self.ports[1]}"]
        return [*self.as_owner, *argv]

    def ledger(self, party: str) -> int:
        """The last bundle id `party` recorded as used (its ledger in its state volume)."""
        out = sh(["docker", "exec", self.container(party), "cat", f"/state/{party}/{party}.used"], timeout=60)
        return int(out.stdout.strip())

    def detect_host(self) -> dict[str, Any]:
        r = sh(self.client_argv(FACE), timeout=240, cwd=ROOT, env=clean_env())
        result = json.loads(r.stdout.strip().splitlines()[-1])
        assert "bundle" not in result  # the client hears of an opaque request id only
        used = self.ledger("server_a")
        assert self.ledger("server_b") == used, "the servers used different bundles"
        assert used > self.last_bundle, f"bundle {used} after {self.last_bundle}"
        self.last_bundle = result["bundle"] = used
        return result


def label_filter(project: str) -> list[str]:
    return ["--filter", f"label=com.docker.compose.project={project}"]


def leftovers(project: str) -> dict[str, list[str]]:
    f = label_filter(project)
    return {
        "containers": sh(["docker", "ps", "-aq", *f], timeout=60).stdout.split(),
        "networks": sh(["docker", "network", "ls", "-q", *f], timeout=60).stdout.split(),
        "volumes": sh(["docker", "volume", "ls", "-q", *f], timeout=60).stdout.split(),
    }


def force_cleanup(dep: Deployment) -> None:
    dep.run("--profile", "init", "--profile", "client", "down", "-v", "--remove-orphans", "-t", "5",
            timeout=180, check=False)
    left = leftovers(dep.project)
    for kind, cmd in (("containers", ["docker", "rm", "-f", "-v"]), ("networks", ["docker", "network", "rm"]),
                      ("volumes", ["docker", "volume", "rm", "-f"])):
        if left[kind]:
            sh([*cmd, *left[kind]], timeout=120, check=False)


@pytest.fixture(scope="module")
def deployment(engine: Engine, built: Built, scratch: Path) -> Iterator[Deployment]:
    # as root: the image's own user; otherwise this user, so that the host client can read its key
    uid, gid = (IMAGE_UID, IMAGE_UID) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    deploy = scratch / "deploy"
    deploy.mkdir()
    if os.geteuid() == 0:
        os.chown(deploy, uid, gid)  # the README's `chown 10001:10001 .secdfd`
    ports = (free_port(), free_port())
    env = clean_env(SECDFD_IMAGE=IMAGE, SECDFD_DEPLOY=str(deploy), SECDFD_PORT_A=str(ports[0]),
                    SECDFD_PORT_B=str(ports[1]))
    if os.geteuid() != 0:
        env.update(SECDFD_UID=str(uid), SECDFD_GID=str(gid))
    project = f"secdfdtest{uuid.uuid4().hex[:10]}"

    t0 = time.monotonic()
    r = sh([BIN / "secdfd", "detect", "--no-crop", FACE, "--json"], timeout=300, cwd=ROOT, env=clean_env())
    plain = json.loads(r.stdout)
    log(f"plaintext reference {plain} ({time.monotonic() - t0:.0f} s)")

    if DEPTH:
        (built.context / DEPTH_FILE).write_text("services:\n" + "".join(
            f"  {s}:\n    environment:\n      SECDFD_SERVER_DEPTH: \"{DEPTH}\"\n" for s in ("server_a", "server_b")))
    dep = Deployment(engine.compose, project, built.context, deploy, env, uid, gid, ports, plain)
    if os.geteuid() == 0:
        setpriv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
        probe = sh([*setpriv, BIN / "secdfd-client", "--help"], timeout=120, check=False, cwd=ROOT, env=clean_env())
        if probe.returncode == 0:
            dep.as_owner = setpriv
        else:  # e.g. this environment lies in a folder that uid cannot enter
            log(f"uid {uid} cannot run {BIN / 'secdfd-client'} ({probe.stderr.strip()[-200:]}): the host client "
                "runs as root")
    try:
        t0 = time.monotonic()
        dep.run("--profile", "init", "run", "--rm", "-T", "init", timeout=600)
        dep.seconds["init"] = time.monotonic() - t0
        t0 = time.monotonic()
        dep.run("up", "-d", *PARTIES, timeout=300)
        dep.wait_ready({"server_a": 0, "server_b": 0})
        dep.seconds["up"] = time.monotonic() - t0
        log(f"project {project}: init {dep.seconds['init']:.0f} s, up and ready {dep.seconds['up']:.0f} s, "
            f"host ports {ports}")
        yield dep
    finally:
        force_cleanup(dep)


# --- the tests ---------------------------------------------------------------------------------


def test_gpu_override_config() -> None:
    """The GPU override merges with docker-compose.yml: `config` needs a compose tool, no engine, no GPU."""
    compose = compose_command()
    if compose is None:
        if os.geteuid() != 0:
            pytest.skip("neither `docker compose` nor docker-compose is installed (and this user cannot install them)")
        apt_install(["docker-compose"])
        compose = compose_command()
        assert compose is not None
    env = clean_env(SECDFD_GPU_TORCH_INDEX="https://example.invalid/whl/cu999", SECDFD_WHEELS="wheels",
                    SECDFD_BASE_IMAGE="secdfd-base:bookworm")
    r = sh([*compose, "-f", "docker-compose.yml", "-f", "docker-compose.gpu.yml", "config"], timeout=120, cwd=ROOT,
           env=env)
    services = yaml.safe_load(r.stdout)["services"]
    for name in ("server_a", "server_b"):
        svc = services[name]
        # the GPU override's torch index, the other build arguments from docker-compose.yml
        assert svc["build"]["args"] == {"BASE_IMAGE": "secdfd-base:bookworm", "WHEELS": "wheels",
                                        "TORCH_INDEX": "https://example.invalid/whl/cu999",
                                        "PIP_INDEX": "https://pypi.org/simple"}
        assert svc["environment"]["SECDFD_SERVER_DEVICE"] == "cuda" and svc["image"] == "secdfd:gpu"
        assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
        assert svc["user"] == f"{IMAGE_UID}:{IMAGE_UID}"
    for name in ("dealer", "client", "init"):
        svc = services[name]
        assert svc["build"]["args"]["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
        assert svc["image"] == "secdfd:latest" and "SECDFD_SERVER_DEVICE" not in svc.get("environment", {})


def test_image_is_lean_and_unprivileged(built: Built) -> None:
    info = json.loads(sh(["docker", "image", "inspect", IMAGE], timeout=60).stdout)[0]
    assert info["Config"]["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert built.size < 1.2e9, f"the image grew to {built.size / 1e6:.0f} MB"
    r = sh(["docker", "run", "--rm", IMAGE, "sh", "-c", "id -u; python3 -c 'import torch; print(torch.__version__)'; "
            "ls -d /src /wheels /root/.cache/pip 2>/dev/null; true"], timeout=120)
    assert r.stdout.split() == [str(IMAGE_UID), "2.13.0+cpu"], "not user 10001, not CPU torch, or build leftovers"
    # a new ledger volume is writable by any uid the services are told to run as (SECDFD_UID)
    sh(["docker", "run", "--rm", "--user", "23456:23456", "-v", "/state/server_a", IMAGE,
        "sh", "-c", "touch /state/server_a/probe"], timeout=120)
    log(f"image {IMAGE}: {built.size / 1e6:.0f} MB; cold/warm steps {built.seconds}")


def test_init_writes_private_keys_for_the_service_user(deployment: Deployment) -> None:
    keys, shares = deployment.deploy / "keys", deployment.deploy / "shares"
    assert {p.name for p in shares.iterdir()} >= {"model.json", "server_a.weights", "server_b.weights"}
    secrets = sorted(keys.glob("*/*.key_secret"))
    assert [p.parent.name for p in secrets] == sorted(["client", "dealer", "server_a", "server_b"])
    for p in [*secrets, shares / "server_a.weights", shares / "server_b.weights"]:
        st = p.stat()
        assert (st.st_mode & 0o777, st.st_uid) == (0o600, deployment.uid), p
    for party in ("client", *PARTIES):
        assert (keys / party).stat().st_mode & 0o777 == 0o700


def test_each_container_mounts_only_its_own_keys_and_share(deployment: Deployment) -> None:
    dep = deployment
    d, project = dep.deploy, dep.project
    expected = {
        "dealer": {"/keys/dealer": ("bind", d / "keys/dealer", False),
                   "/shares/model.json": ("bind", d / "shares/model.json", False),
                   "/state/dealer": ("volume", f"{project}_dealer-state", True)},
        "server_a": {"/keys/server_a": ("bind", d / "keys/server_a", False),
                     "/shares/server_a.weights": ("bind", d / "shares/server_a.weights", False),
                     "/state/server_a": ("volume", f"{project}_server_a-state", True)},
        "server_b": {"/keys/server_b": ("bind", d / "keys/server_b", False),
                     "/shares/server_b.weights": ("bind", d / "shares/server_b.weights", False),
                     "/state/server_b": ("volume", f"{project}_server_b-state", True)},
        "client": {"/keys/client": ("bind", d / "keys/client", False),
                   "/images": ("bind", dep.context / "examples", False)},
    }
    name = f"{project}-client-mounts"
    dep.run("--profile", "client", "run", "-d", "-T", "--name", name, "client", "true", timeout=120)
    try:
        cids = {s: dep.container(s) for s in PARTIES} | {"client": name}
        for service, cid in cids.items():
            info = dep.inspect(cid)
            mounts = {m["Destination"]: (m["Type"], Path(m["Source"]) if m["Type"] == "bind" else m["Name"], m["RW"])
                      for m in info["Mounts"]}
            assert mounts == expected[service], service
            assert info["Config"]["User"] == f"{dep.uid}:{dep.gid}", service
    finally:
        sh(["docker", "rm", "-f", name], timeout=60, check=False)
    # the services really run unprivileged, and their ledgers are written to the volumes
    assert sh(["docker", "exec", cids["server_a"], "id", "-u"], timeout=60).stdout.strip() == str(dep.uid)


def test_detect_from_host_and_from_client_container(deployment: Deployment) -> None:
    dep, plain = deployment, deployment.plain
    t0 = time.monotonic()
    host = dep.detect_host()
    t_host = time.monotonic() - t0
    assert host["verdict"] == plain["verdict"] and abs(host["p_fake"] - plain["p_fake"]) < 1e-3, (host, plain)

    t0 = time.monotonic()
    r = dep.run("--profile", "client", "run", "--rm", "-T", "client", "secdfd-client", "detect", "--no-crop",
                "/images/face.png", timeout=300)
    t_client = time.monotonic() - t0
    m = re.search(r"^/images/face\.png: (real|fake) \(p_fake ([0-9.]+)\)", r.stdout, re.M)
    assert m, r.stdout + r.stderr
    assert m.group(1) == plain["verdict"] and abs(float(m.group(2)) - plain["p_fake"]) < 1e-3, (m.group(0), plain)
    for party in ("server_a", "server_b"):
        ledger = sh(["docker", "exec", dep.container(party), "stat", "-c", "%u %s", f"/state/{party}/{party}.used"],
                    timeout=60).stdout.split()
        assert ledger[0] == str(dep.uid) and int(ledger[1]) > 0
    log(f"detections: host {t_host:.1f} s (p_fake {host['p_fake']:.3g}, plaintext {plain['p_fake']:.3g}, "
        f"bundle {host['bundle']}), client container {t_client:.1f} s ({m.group(0)})")


def _tx_bytes(pid: int) -> int:
    """Bytes sent by the container whose main process is `pid` (its network namespace's eth0)."""
    for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines():
        if line.strip().startswith("eth0:"):
            return int(line.split(":", 1)[1].split()[8])
    raise AssertionError(f"no eth0 in /proc/{pid}/net/dev")


def _lose_server_b_in_flight(dep: Deployment, crash: bool) -> None:
    """Start a detection, stop server_b during its online phase, check the client's error.

    The online phase is under way once server_b has sent 5 MB (to server_a; it sends 89 MB per
    inference of the embedded model, while bundles from the dealer only come in). `crash` kills its
    process from the host (as a crash or the OOM killer would), otherwise `docker kill`.
    """
    if dep.last_bundle < 0:  # the next detection after the loss must use a greater bundle than this one
        dep.detect_host()
    cid = dep.container("server_b")
    pid = int(dep.inspect(cid)["State"]["Pid"])
    sent = _tx_bytes(pid)
    proc = subprocess.Popen(dep.client_argv(FACE, timeout=60), cwd=ROOT, env=clean_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _tx_bytes(pid) - sent < 5e6:
            assert proc.poll() is None, f"the detection ended before server_b got going: {proc.communicate()}"
            assert time.monotonic() < deadline, "server_b sent nothing within 120 s"
            time.sleep(0.02)
        if crash:
            os.kill(pid, signal.SIGKILL)
        else:
            sh(["docker", "kill", cid], timeout=60)
        t_kill = time.monotonic()
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    waited = time.monotonic() - t_kill
    lines = err.strip().splitlines()
    log(f"{'crash' if crash else 'docker kill'} of server_b in flight: client exit {proc.returncode} after "
        f"{waited:.1f} s: {err.strip()}")
    assert proc.returncode != 0
    assert "server_b" in assert_failed_record(out, FACE)["error"]
    assert len(lines) == 1 and "server_b" in lines[0] and "Traceback" not in err, err
    assert waited < 20, "the client waited for its deadline instead of hearing that server_b went away"


def test_docker_kill_of_server_b_in_flight(deployment: Deployment) -> None:
    dep = deployment
    ready = dep.ready_lines("server_b")
    _lose_server_b_in_flight(dep, crash=False)
    time.sleep(3)
    state = dep.inspect(dep.container("server_b"))["State"]
    # Docker 20.10 counts `docker kill` as an operator's stop for every restart policy (always,
    # unless-stopped and on-failure alike): the container stays down until it is started again.
    log(f"server_b 3 s after docker kill: {state['Status']}")
    if not state["Running"]:
        dep.run("start", "server_b", timeout=120)
    t0 = time.monotonic()
    dep.wait_ready({"server_b": ready})
    result = dep.detect_host()  # fresh bundle: checked against the one before the kill
    log(f"after docker kill: server_b ready again in {time.monotonic() - t0:.0f} s, next detection "
        f"{result['verdict']} with bundle {result['bundle']}")
    assert result["verdict"] == dep.plain["verdict"] and abs(result["p_fake"] - dep.plain["p_fake"]) < 1e-3


def test_restart_policy_brings_back_a_crashed_server_b(deployment: Deployment) -> None:
    dep = deployment
    if not dep.inspect(dep.container("server_b"))["State"]["Running"]:  # a failed test before left it stopped
        before = dep.ready_lines("server_b")
        dep.run("start", "server_b", timeout=120)
        dep.wait_ready({"server_b": before})
    ready = dep.ready_lines("server_b")
    restarts = dep.inspect(dep.container("server_b"))["RestartCount"]
    _lose_server_b_in_flight(dep, crash=True)
    t0 = time.monotonic()
    dep.wait_ready({"server_b": ready})  # nobody starts it: the restart policy does
    assert dep.inspect(dep.container("server_b"))["RestartCount"] == restarts + 1
    result = dep.detect_host()
    log(f"after a crash: server_b restarted by the engine and ready in {time.monotonic() - t0:.0f} s, next "
        f"detection with bundle {result['bundle']}")


def test_down_leaves_nothing_of_the_project(deployment: Deployment) -> None:
    dep = deployment
    t0 = time.monotonic()
    dep.run("down", "-v", timeout=180)
    assert leftovers(dep.project) == {"containers": [], "networks": [], "volumes": []}
    log(f"down -v in {time.monotonic() - t0:.0f} s")
