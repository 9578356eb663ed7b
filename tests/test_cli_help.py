"""What `--help` and `--version` tell a new user: every option explained, with its environment
variable; command summaries that are not cut off; the state folder's variable works."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from secdfd.client.main import main as client_main
from secdfd.common.cli.main import main
from secdfd.common.cli.server import server_command
from secdfd.dealer.main import main as dealer_main
from secdfd.server_a.leader import Leader
from secdfd.server_b.follower import Follower

COMMANDS = {"secdfd": main, "secdfd-client": client_main, "secdfd-dealer": dealer_main,
            "server_a": server_command(Leader), "server_b": server_command(Follower)}


def walk(cmd: click.Command, path: str) -> list[tuple[str, click.Command]]:
    out = [(path, cmd)]
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            out += walk(sub, f"{path} {name}")
    return out


ALL = [pc for name, cmd in COMMANDS.items() for pc in walk(cmd, name)]


@pytest.mark.parametrize(("path", "cmd"), ALL, ids=[p for p, _ in ALL])
def test_every_option_has_help_and_shows_its_environment_variable(path: str, cmd: click.Command) -> None:
    for p in cmd.params:
        if isinstance(p, click.Option) and p.expose_value:
            assert p.help, f"{path} {p.opts[0]} has no help text"
            assert p.show_envvar, f"{path} {p.opts[0]} does not show its environment variable"
    args = path.split()[1:] if path.startswith(("secdfd ", "secdfd-client ")) else []
    root = COMMANDS[path.split()[0]]
    r = CliRunner().invoke(root, [*args, "--help"])
    assert r.exit_code == 0, r.output
    if any(isinstance(p, click.Option) and p.expose_value for p in cmd.params):
        assert "env var: SECDFD_" in " ".join(r.output.split()), r.output


def test_help_names_the_environment_variables_click_reads() -> None:
    r = CliRunner().invoke(main, ["up", "--help"])
    assert "SECDFD_STATE" in r.output and "SECDFD_THREADS" in r.output and "SECDFD_UP_DEPTH" in r.output
    r = CliRunner().invoke(client_main, ["detect", "--help"])
    assert "SECDFD_CLIENT_KEYS" in r.output and "SECDFD_CLIENT_DETECT_FRAMES" in r.output
    r = CliRunner().invoke(main, ["train", "--help"])
    assert "Passes over the training split." in r.output and "Images per optimiser step." in r.output


def test_command_summaries_are_whole() -> None:
    for root, args in ((main, []), (main, ["bench"]), (main, ["keys"]), (main, ["data"]), (client_main, [])):
        r = CliRunner().invoke(root, [*args, "--help"])
        listing = r.output.split("Commands:")[1]
        assert "..." not in listing, listing


def test_versions() -> None:
    from importlib.metadata import version

    for cmd in (main, client_main):
        r = CliRunner().invoke(cmd, ["--version"])
        assert r.exit_code == 0 and r.output.strip().endswith(version("secdfd")), r.output
    assert CliRunner().invoke(client_main, ["--version"]).output.startswith("secdfd-client, version")


def test_secdfd_state_moves_the_state_folder(tmp_path) -> None:
    r = CliRunner().invoke(main, ["status"], env={"SECDFD_STATE": str(tmp_path / "elsewhere")})
    assert r.exit_code == 1 and f"nothing started from {tmp_path / 'elsewhere'}" in r.output
    assert "SECDFD_STATE" in CliRunner().invoke(main, ["--help"]).output


def test_the_report_module_has_help() -> None:
    r = subprocess.run([sys.executable, "-m", "secdfd.common.bench.report", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--compare" in r.stdout
