"""The public Python API the README and the notebooks use."""

from __future__ import annotations

import importlib
import json

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


def test_layers_import_on_their_own():
    for name in ("moesim.hardware", "moesim.traces", "moesim.placement", "moesim.sim", "moesim.metrics",
                 "moesim.study", "moesim.report.files", "moesim.report.plots", "moesim.report.timeline",
                 "moesim.cli"):
        assert importlib.import_module(name).__name__ == name


def test_report_subpackage_is_reachable_as_an_attribute():
    import moesim.report.plots as plots  # noqa: PLC0415

    assert plots.write_all
