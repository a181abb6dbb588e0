"""Command line: ``moesim run | validate | place | cluster | model | bench | calibrate | sweep | serving | trace``.

Bad input of any kind - including an output path that cannot take the outputs - prints one line naming the
file and field, and exits with status 2, before any output file is written. Ctrl-C prints
``moesim: interrupted`` and exits with status 130; outputs are written atomically, so it leaves the older
outputs or the new ones, never a mix (:mod:`moesim.fileio`).

One module per command group, each registering its subcommands through ``add_parsers``: :mod:`.run` (run,
validate, place), :mod:`.bench`, :mod:`.calibrate`, :mod:`.sweep`, :mod:`.serving`, :mod:`.cluster`,
:mod:`.model`, :mod:`.trace`; :mod:`.common` holds what several share. This is the top layer: it may import
every other one.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from moesim.cli import bench, calibrate, cluster, model, run, serving, sweep, trace
from moesim.errors import InputError


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported as every other bad input is: one line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        helps = " ".join(["moesim", *self.prog.split()[1:], "--help"])
        self.exit(2, f"moesim: error: {' '.join(message.split())} ({helps} lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="moesim", description="Simulate MoE expert placements on GPU clusters.")
    sub = p.add_subparsers(dest="command", required=True)
    # the order ``moesim --help`` lists them in
    for group in (run, bench, calibrate, sweep, serving, cluster, model, trace):
        group.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except InputError as exc:
        print(f"moesim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: no traceback; what was being written has been cleaned up
        print("moesim: interrupted", file=sys.stderr)
        return 130
    except MemoryError:  # the estimates (moesim.budget) missed it: still one line, and nothing was written
        print("moesim: error: ran out of memory; the input is larger than this machine (or MOESIM_MAX_MEMORY_GB) "
              "allows", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head or less, closed early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
