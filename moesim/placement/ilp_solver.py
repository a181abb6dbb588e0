"""Solving PuLP models for the placement ILPs: solver choice, time limit, gap, warm start, proven bound.

``solver``: ``"highs"`` (HiGHS through highspy, PuLP's ``HiGHS`` API; ``pip install moesim[ilp]``),
``"cbc"`` (the CBC binary PuLP 2.8-3.x bundles; pinned in pyproject because PuLP 4 no longer ships it)
or ``"auto"`` (HiGHS when highspy imports, else CBC). Every solve returns the solver's best incumbent
and its proven lower bound (HiGHS: ``mip_dual_bound``; CBC: the ``Lower bound`` of its log), so a run
cut by ``time_limit_s`` still reports how far from optimal it may be. A known incumbent seeds the
search: CBC gets it as a MIP start, HiGHS as an objective cutoff (``objective_bound``), so the solver
only looks for strictly better answers and the caller keeps the incumbent when none is found.
Deliberately ignored: solver threads (one, so results repeat) and solver-specific tuning.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import pulp

from moesim.errors import InputError

SOLVERS = ("auto", "highs", "cbc")


def new_var(model: pulp.LpProblem, name: str, low: float | None = None, up: float | None = None,
            cat: str = "Continuous") -> pulp.LpVariable:
    """A variable of ``model``: PuLP 3's ``add_variable`` where it exists, else the PuLP 2 constructor."""
    if hasattr(model, "add_variable"):
        return model.add_variable(name, low, up, cat=cat)
    return pulp.LpVariable(name, low, up, cat=cat)


def highs_available() -> bool:
    return importlib.util.find_spec("highspy") is not None


def resolve_solver(name: str) -> str:
    """``auto`` -> ``highs`` when highspy is installed, else ``cbc``; unknown names raise InputError."""
    if name not in SOLVERS:
        raise InputError(f"must be one of {', '.join(SOLVERS)}, got {name!r}", field="solver")
    if name == "auto":
        return "highs" if highs_available() else "cbc"
    if name == "highs" and not highs_available():
        raise InputError("HiGHS needs highspy: pip install 'moesim[ilp]' (or use solver: cbc)", field="solver")
    return name


@contextlib.contextmanager
def _no_native_stdout() -> Iterator[None]:
    """HiGHS prints its banner from C++ to the process's stdout, past Python's ``sys.stdout`` and past
    ``msg=False``: point file descriptor 1 at /dev/null while it runs, so a report on stdout stays the report."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no file descriptor 1 (an embedded interpreter): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@dataclass(frozen=True)
class SolveResult:
    status: str  # optimal | time_limit | infeasible | no_solution
    objective: float | None  # the solver's incumbent (None: none better than the cutoff, or none at all)
    bound: float  # proven lower bound (minimisation); -inf when unknown
    seconds: float
    solver: str


def solve(model: pulp.LpProblem, *, solver: str, time_limit_s: float, gap: float,
          incumbent: float | None = None, warm_start: bool = False, node_limit: int | None = None) -> SolveResult:
    """Solve a minimisation ``model``; variables keep the solver's values when it returns a solution.

    ``incumbent``: objective of a known solution (cutoff for HiGHS); ``warm_start``: the variables'
    initial values (``setInitialValue``) are a solution to start from (CBC). ``node_limit`` bounds the
    branch-and-bound tree: a deterministic budget (the answer does not depend on the machine's speed),
    where ``time_limit_s`` is only a safety net.
    """
    name = resolve_solver(solver)
    t0 = time.perf_counter()
    if name == "highs":
        opts: dict[str, Any] = {"threads": 1}
        if node_limit is not None:
            opts["mip_max_nodes"] = int(node_limit)
        if incumbent is not None:
            opts["objective_bound"] = float(incumbent)
        s = pulp.HiGHS(msg=False, timeLimit=max(float(time_limit_s), 0.01), gapRel=gap, **opts)
        try:
            with _no_native_stdout():
                status = model.solve(s)
        except KeyError:  # PuLP 3.3 has no mapping for HiGHS's node-limit status: read the solution here
            status = pulp.LpStatusNotSolved
            values = model.solverModel.getSolution().col_value
            for var in model.variables():
                var.varValue = values[var.index]
        import highspy
        h = model.solverModel
        info = h.getInfo()
        ms = h.getModelStatus()
        has_sol = info.primal_solution_status == 2  # kSolutionStatusFeasible
        objective = float(pulp.value(model.objective)) if has_sol and status != pulp.LpStatusInfeasible else None
        bound = float(info.mip_dual_bound) if model.isMIP() else float(info.objective_function_value)
        if ms == highspy.HighsModelStatus.kOptimal:
            state = "optimal"
        elif ms == highspy.HighsModelStatus.kInfeasible:
            # with a cutoff, nothing better than the incumbent exists: the incumbent is optimal
            state = "optimal" if incumbent is not None else "infeasible"
            bound = float(incumbent) if incumbent is not None else float("inf")
            objective = None
        else:
            limits = (highspy.HighsModelStatus.kTimeLimit, highspy.HighsModelStatus.kSolutionLimit,
                      highspy.HighsModelStatus.kIterationLimit)
            state = "time_limit" if ms in limits or has_sol else "no_solution"
        if not math.isfinite(bound) and state != "infeasible":
            bound = float("-inf")
        return SolveResult(state, objective, bound, time.perf_counter() - t0, "highs")
    fd, log = tempfile.mkstemp(prefix="moesim-cbc-", suffix=".log")
    os.close(fd)
    try:
        with warnings.catch_warnings():  # PuLP 3 warns that PuLP 4 drops the bundled CBC; we pin < 4
            warnings.simplefilter("ignore", DeprecationWarning)
            s = pulp.PULP_CBC_CMD(msg=False, timeLimit=max(float(time_limit_s), 0.01), gapRel=gap, threads=1,
                                  warmStart=warm_start, logPath=log,
                                  options=[f"maxNodes {int(node_limit)}"] if node_limit is not None else None)
        status = model.solve(s)
        text = open(log).read()
    finally:
        os.unlink(log)
    m = re.search(r"Lower bound:\s*([-+0-9.eE]+)", text)
    bound = float(m.group(1)) if m else float("-inf")
    if status == pulp.LpStatusInfeasible or "Problem is infeasible" in text:
        return SolveResult("infeasible", None, float("inf"), time.perf_counter() - t0, "cbc")
    objective = pulp.value(model.objective)
    stopped = "Stopped on" in text or "Result - Stopped" in text
    state = "time_limit" if stopped else ("optimal" if status == pulp.LpStatusOptimal else "no_solution")
    if state == "optimal" and objective is not None and bound == float("-inf"):
        bound = float(objective) * (1 - gap)
    if model.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        objective = None
    return SolveResult(state, None if objective is None else float(objective), bound,
                       time.perf_counter() - t0, "cbc")
