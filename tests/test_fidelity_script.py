"""benchmarks/fidelity.py runs for minutes: its figures go to stdout line by line, unchanged by the progress bar
it shows on stderr (none with -q), and each section tells the bar as many steps as it announces. The sections'
own work is replaced by stand-ins here; the real figures are the benchmark's business, not a test's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fidelity() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fidelity_under_test", REPO / "benchmarks" / "fidelity.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _section(lines: list[str]) -> Any:
    def run(args: Any, tick: Any) -> None:
        for line in lines:
            print(line, end="")  # partial lines too: the bar must never split one
            print()
            tick(1)
    return run


@pytest.mark.parametrize("quiet", [False, True])
def test_figures_on_stdout_unchanged_progress_on_stderr(fidelity, quiet, monkeypatch, capsys):
    monkeypatch.setattr(fidelity, "SECTIONS", [("1. one", _section(["a", "b"]), 2), ("2. two", _section(["c"]), 1)])
    monkeypatch.setattr(sys, "argv", ["fidelity.py", *(["-q"] if quiet else [])])
    fidelity.main()
    out, err = capsys.readouterr()
    assert out == "== 1. one ==\na\nb\n\n== 2. two ==\nc\n"
    if quiet:
        assert err == ""
    else:
        assert "fidelity:" in err and "/3 [" in err and "\n" not in err.strip("\n"), err  # one bar, redrawn


def test_moetuner_tells_the_steps_it_announces(fidelity, monkeypatch, capsys):
    """Section 6 is the long one (minutes): its bar advances per study, MOETUNER_STEPS in all."""
    def runs(scenario: Any) -> dict[tuple[str, str], tuple[float, ...]]:
        return {(c.name, p): (10.0, 1.0, 1.0, 1.0, 0.5, 0.3) for c in scenario.clusters for p in ("contiguous", "ilp")}

    monkeypatch.setattr(fidelity, "_moetuner_runs", runs)
    monkeypatch.setattr(fidelity, "_hot_rank", lambda scenario: [(0.7, 0.4)] * len(scenario.clusters))
    ticks: list[int] = []
    fidelity.moetuner(ticks.append)
    assert ticks == [1] * fidelity.MOETUNER_STEPS
    assert "direction reproduced" in capsys.readouterr().out
    (section6,) = [s for s in fidelity.SECTIONS if s[0].startswith("6.")]
    assert section6[2] == fidelity.MOETUNER_STEPS
