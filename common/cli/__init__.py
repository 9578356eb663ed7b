"""The command line: the `secdfd` group (`main`) with its subcommands, registered explicitly, and the
option blocks the entry points share (`server`, for `secdfd-server`). The only package with click.

May import: every package of `secdfd.common`.
"""
