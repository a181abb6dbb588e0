"""moesim: which Mixture-of-Experts expert placement serves fastest on your GPU cluster, and by how much.

Layers, each importing only those before it: hardware -> traces -> placement -> sim -> metrics and
calibration -> study -> report -> cli (errors and fileio serve all; measure, the GPU micro-benchmarks that
need torch, stands apart).
The public API below is what the CLI and the notebooks use::

    import moesim
    scenario = moesim.load_scenario("scenarios/multinode.yaml")
    result = moesim.run_study(scenario)
    print(moesim.format_report(result.metrics(), scenario.baseline))
    moesim.write_outputs(result, "results/multinode")

docs/api.md describes each function and the objects they return.
"""

from moesim.errors import InputError
from moesim.report.disagg import write_disaggregated
from moesim.report.files import write_outputs
from moesim.report.serving import write_serving
from moesim.report.text import format_report
from moesim.study import Scenario, StudyPlan, StudyResult, load_scenario, parse_scenario, prepare, run_study
from moesim.study.disagg import load_any, run_disaggregated
from moesim.study.serving import serving_sweep

__version__ = "0.1.0"

__all__ = ["InputError", "Scenario", "StudyPlan", "StudyResult", "format_report", "load_any", "load_scenario",
           "parse_scenario", "prepare", "run_disaggregated", "run_study", "serving_sweep", "write_disaggregated",
           "write_outputs", "write_serving", "__version__"]
