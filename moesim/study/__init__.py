"""Study layer: scenario files to validated objects, and running them (sits between metrics and report)."""

from moesim.study.config import Scenario, load_scenario, parse_scenario
from moesim.study.plan import ClusterPlan, StudyPlan, prepare
from moesim.study.runner import Run, StudyResult, run_study
from moesim.study.workload import build_workload, expert_loads

__all__ = ["ClusterPlan", "Run", "Scenario", "StudyPlan", "StudyResult", "build_workload", "expert_loads",
           "load_scenario", "parse_scenario", "prepare", "run_study"]
