"""`secdfd`: one command group, one subcommand (or group) per role.

Each area registers its commands from its own module so that the pieces stay independent:
- `bench` (protocols, model, e2e): secdfd.common.cli_bench
- `data`, `train`, `eval`, `detect`, `export`: secdfd.common.cli_model
- `keys`, `share`, `up`, `down`, `status`: secdfd.common.cli_service
Options can also be set from environment variables named SECDFD_<OPTION>.
"""

from __future__ import annotations

import importlib

import click

_AREAS = ("secdfd.common.cli.bench", "secdfd.common.cli.model", "secdfd.common.cli.service")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "SECDFD"})
@click.version_option(package_name="secdfd")
def main() -> None:
    """SecDFD: privacy-preserving DeepFake face detection.

    Two non-colluding servers evaluate the DFDNet detector on secret shares of a face image and of
    the model's weights; a trusted dealer supplies correlated randomness; only the client learns
    the verdict.
    """


def _register() -> None:
    for name in _AREAS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that area is not built yet
                continue
            raise
        for cmd in mod.COMMANDS:
            if cmd.name in main.commands:
                raise RuntimeError(f"command {cmd.name!r} registered twice")
            main.add_command(cmd)


_register()
