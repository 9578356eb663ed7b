"""`secdfd`: one command group, one subcommand (or group) per area, registered here explicitly.

- `bench` (protocols, model, e2e, fidelity): secdfd.common.cli.bench
- `data`, `train`, `eval`, `detect`, `export`: secdfd.common.cli.model
- `keys`, `share`, `up`, `down`, `status`: secdfd.common.cli.service
Options can also be set from environment variables: SECDFD_<COMMAND>_<OPTION> (`--help` names each
one), and SECDFD_STATE for the state folder of `up`, `down` and `status`.
"""

from __future__ import annotations

import click

from secdfd.common.cli import bench, model, service
from secdfd.common.cli.envvars import show_envvars


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "SECDFD"})
@click.version_option(package_name="secdfd")
def main() -> None:
    """SecDFD: privacy-preserving DeepFake face detection.

    Two non-colluding servers evaluate the DFDNet detector on secret shares of a face image and of
    the model's weights; a trusted dealer supplies correlated randomness; only the client learns
    the verdict.

    Every option can also be set from the environment variable its --help names; SECDFD_STATE is the
    state folder of `up`, `status` and `down` (default .secdfd).
    """


COMMANDS: tuple[click.Command, ...] = (
    bench.bench,
    model.data_group, model.train_cmd, model.eval_cmd, model.detect_cmd, model.export_cmd,
    service.keys_cmd, service.share_cmd, service.up_cmd, service.down_cmd, service.status_cmd,
)
for _cmd in COMMANDS:
    if _cmd.name in main.commands:
        raise RuntimeError(f"command {_cmd.name!r} registered twice")
    main.add_command(_cmd)
show_envvars(main)
