"""Write nbdserve(1), a man page made from the command line's own help (click), so it
never disagrees with --help.

    .venv/bin/python scripts/manpage.py > nbdserve.1
"""

from __future__ import annotations

import datetime
import sys

import click

from nbdserve import __version__
from nbdserve.cli import main


def escape(text: str) -> str:
    text = text.replace("\\", "\\\\").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in text.splitlines())


def commands(group: click.Group, prefix: list[str]):
    """Every command below group, depth first, with its full name."""
    context = click.Context(group)
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        if command is None or command.hidden:
            continue
        yield [*prefix, name], command
        if isinstance(command, click.Group):
            yield from commands(command, [*prefix, name])


def section(path: list[str], command: click.Command) -> list[str]:
    context = click.Context(command, info_name=" ".join(["nbdserve", *path]))
    out = [f".SS {escape(' '.join(path))}",
           f".B {escape(' '.join(['nbdserve', *path]))}",
           escape(" ".join(command.collect_usage_pieces(context))), ".PP"]
    help_text = command.help or command.short_help or ""
    for paragraph in help_text.split("\n\n"):
        out += [escape(" ".join(paragraph.split())), ".PP"]
    for parameter in command.get_params(context):
        if isinstance(parameter, click.Argument):
            continue  # named in the usage line
        record = parameter.get_help_record(context)
        if record is None:
            continue
        names, text = record
        out += [".TP", f".B {escape(names)}", escape(text or "")]
    return out


def manpage() -> str:
    today = datetime.date.today().isoformat()
    lines = [f'.TH NBDSERVE 1 "{today}" "nbdserve {__version__}" "User Commands"',
             ".SH NAME", "nbdserve \\- NBD server for raw images with persistent dirty bitmaps",
             ".SH SYNOPSIS", ".B nbdserve", "COMMAND [OPTIONS] [ARGUMENTS]",
             ".SH DESCRIPTION", escape(" ".join((main.help or "").split())),
             ".SH COMMANDS"]
    for path, command in commands(main, []):
        if isinstance(command, click.Group):
            lines += [f".SS {escape(' '.join(path))} ...",
                      escape(" ".join((command.help or "").split())), ".PP"]
            continue
        lines += section(path, command)
    lines += [".SH SHELL COMPLETION",
              "bash: eval \"$(_NBDSERVE_COMPLETE=bash_source nbdserve)\"; zsh and fish: "
              "zsh_source, fish_source.",
              ".SH FILES", "/etc/nbdserve/*.toml, IMAGE.qdb, IMAGE.qdb.journal",
              ".SH SEE ALSO", "nbdinfo(1), nbdcopy(1), qemu\\-nbd(8), nbd\\-client(8)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(manpage())
