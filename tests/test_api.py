"""The public Python API the README and the notebooks use."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import moesim


def test_public_names():
    for name in moesim.__all__:
        assert hasattr(moesim, name), name
    assert moesim.__version__ == "0.1.0"


def test_readme_example(tiny_scenario_file, tmp_path):
    scenario = moesim.load_scenario(tiny_scenario_file)
    result = moesim.run_study(scenario, progress=False)
    text = moesim.format_report(result.metrics(), scenario.baseline)
    assert "Verdict:" in text and "contiguous" in text
    written = moesim.write_outputs(result, tmp_path / "out", plots_on=False)
    assert tmp_path / "out" / "results.json" in written
    assert json.loads((tmp_path / "out" / "results.json").read_text())["scenario"] == "tiny"
    with pytest.raises(moesim.InputError):
        moesim.parse_scenario({"name": "x"}, "x.yaml")


def test_layers_import_in_a_fresh_interpreter():
    """Every layer imports, lowest first, in an interpreter that has imported nothing else; which layer may
    import which is tests/test_layers.py's check, read from the source."""
    layers = ["moesim.hardware", "moesim.traces", "moesim.placement", "moesim.sim", "moesim.metrics",
              "moesim.calibration", "moesim.study", "moesim.report.files", "moesim.report.plots",
              "moesim.report.timeline", "moesim.cli"]
    proc = subprocess.run([sys.executable, "-c", "\n".join(f"import {name}" for name in layers)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_report_subpackage_is_reachable_as_an_attribute():
    """``import moesim`` alone makes ``moesim.report.plots`` reachable by attribute (in a fresh interpreter:
    in this one, other tests have imported it already)."""
    code = "import moesim; print(moesim.report.plots.write_all.__module__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (proc.returncode, proc.stdout) == (0, "moesim.report.plots\n"), proc.stderr
