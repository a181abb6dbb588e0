"""Study layer: scenario files to validated objects, and running them (sits between metrics and report)."""

from moesim.study.config import Scenario, load_scenario, parse_scenario
from moesim.study.runner import Run, StudyResult, build_workload, expert_loads, run_study

__all__ = ["Run", "Scenario", "StudyResult", "build_workload", "expert_loads", "load_scenario", "parse_scenario",
           "run_study"]
