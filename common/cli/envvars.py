"""Help that names each option's environment variable (click's `show_envvar`), for every command.

Options take their values from environment variables: an explicit `envvar`, or the name click
derives from the group's `auto_envvar_prefix` (SECDFD_<COMMAND>_<OPTION>). `--help` shows it as
"env var: ...". Options that hold no value (--help, --version) have none.
"""

from __future__ import annotations

import click


def show_envvars(cmd: click.Command) -> click.Command:
    """Set `show_envvar` on every value-holding option of `cmd` and of its subcommands; returns `cmd`."""
    for p in cmd.params:
        if isinstance(p, click.Option) and p.expose_value:
            p.show_envvar = True
    if isinstance(cmd, click.Group):
        for sub in cmd.commands.values():
            show_envvars(sub)
    return cmd
