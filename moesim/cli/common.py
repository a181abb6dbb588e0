"""Helpers more than one command shares: ``--set KEY=VALUE`` items, flags that must be at least 1, a
scenario's output folder, and progress bars.

Each raises :class:`~moesim.errors.InputError` naming the flag or field, so bad input is one line and exit
status 2.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moesim.errors import InputError
from moesim.loaders import load_yaml

if TYPE_CHECKING:
    from tqdm import tqdm

    from moesim.fileio import FolderKind
    from moesim.study.config import Scenario


def key_values(items: list[str] | None) -> Iterator[tuple[str, Any]]:
    """``--set KEY=VALUE`` items as (KEY, VALUE read as YAML) pairs, one at a time in the order given; KEY is
    a dotted path of names, VALUE one YAML value (:func:`moesim.loaders.load_yaml`: finite numbers, no alias
    bombs); a problem names ``--set KEY``."""
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"needs KEY=VALUE, got {item!r}", field="--set")
        if any(not part.strip() for part in key.split(".")):
            raise InputError(f"KEY must be names joined by dots, got {key!r}", field="--set")
        try:
            yield key, load_yaml(value, None)
        except InputError as exc:
            raise InputError(f"value {value!r}: {exc.detail}", field=f"--set {key}") from None


def at_least_one(value: int | None, flag: str, most: int = 2**31 - 1) -> None:
    """An optional integer flag, when given, must be >= 1 (and at most ``most``)."""
    if value is not None and not 1 <= value <= most:
        raise InputError(f"must be from 1 to {most}, got {value}", field=flag)


def at_least_zero(value: int | None, flag: str, most: int = 2**63 - 1) -> None:
    """An optional integer flag (a seed, a count that may be 0), when given, must be >= 0 (and at most ``most``)."""
    if value is not None and not 0 <= value <= most:
        raise InputError(f"must be from 0 to {most}, got {value}", field=flag)


def check_scenario_output(out: Path, kind: FolderKind, scenario: Scenario, *, flag: str | None) -> None:
    """:func:`moesim.fileio.check_output_folder` for a command's output folder: ``flag``'s value (``-o``), or,
    when the flag was not given, one the scenario's ``output`` field chose. A problem with the latter names the
    scenario file and that field as well as the folder: the user did not type that path on the command line."""
    check_output_folder_of(out, kind, scenario.source, scenario.name, scenario.output, flag=flag)


def check_output_folder_of(out: Path, kind: FolderKind, source: str, name: str, output: Path, *,
                           flag: str | None) -> None:
    """:func:`check_scenario_output` for the scenario file ``source`` named ``name`` whose ``output`` is given."""
    from moesim.fileio import check_output_folder, safe_name

    if flag is not None:
        check_output_folder(out, kind)
        return
    try:
        check_output_folder(out, kind)
    except InputError as exc:
        default = output == Path("results") / safe_name(name)
        shown = f"{exc.source} (not set: the default, from the name)" if default else exc.source
        raise InputError(f"{shown}: {exc.detail}", source=source, field="output") from None


PROGRESS_DELAY_S = 2.0  # a bar appears once its step has run this long: quick commands print nothing more


def progress_bar(total: int, desc: str, unit: str, *, quiet: bool, scale: bool = False) -> tqdm:
    """A progress bar on stderr, as ``moesim run`` and ``sweep`` show them (tqdm, cleared when done; none with
    ``quiet``), shown only for a step that runs longer than :data:`PROGRESS_DELAY_S`; ``scale``: counts as
    1.2M rather than 1200000. It writes nothing else: stdout and the files written are the same with or
    without it."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, disable=quiet, leave=False,
                delay=PROGRESS_DELAY_S)
