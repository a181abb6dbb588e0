"""Command line: ``moesim run | validate | place | cluster | bench | calibrate | sweep | trace``.

Bad input of any kind - including an output path that cannot take the outputs - prints one line naming the
file and field, and exits with status 2, before any output file is written. Ctrl-C prints
``moesim: interrupted`` and exits with status 130; outputs are written atomically, so it leaves the older
outputs or the new ones, never a mix (:mod:`moesim.fileio`).

One module per command group, each registering its subcommands through ``add_parsers``: :mod:`.run` (run,
validate, place), :mod:`.bench`, :mod:`.calibrate`, :mod:`.sweep`, :mod:`.cluster`, :mod:`.trace`;
:mod:`.common` holds what several share. This is the top layer: it may import every other one.
"""

from __future__ import annotations

import argparse
import os
import sys

from moesim.cli import bench, calibrate, cluster, run, sweep, trace
from moesim.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moesim", description="Simulate MoE expert placements on GPU clusters.")
    sub = p.add_subparsers(dest="command", required=True)
    for group in (run, bench, calibrate, sweep, cluster, trace):  # the order ``moesim --help`` lists them in
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
    except BrokenPipeError:  # output piped into head or less, closed early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
