"""The command line end to end: run / validate / place / cluster, result files, bad input, golden summary.

The golden summary (tests/golden/tiny_summary.json) comes from running the code, never from typing numbers:
regenerate it with ``MOESIM_REGEN_GOLDEN=1 python -m pytest tests/test_cli.py -k golden`` after a change that
is meant to move the numbers, and say why in the commit.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moesim.cli import main
from moesim.placement import load_placement, validate_placement
from moesim.traces import SyntheticParams, generate_trace, save_trace

REPO = Path(__file__).resolve().parents[1]
SCENARIO_FILES = sorted((REPO / "scenarios").glob("*.yaml"))
GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny_summary.json"
POLICIES = ["contiguous", "round_robin", "random", "greedy"]


def sig4(x: float) -> float:
    return float(f"{x:.4g}")


def summary(results: dict) -> dict:
    """The golden numbers: per placement, a few metrics rounded to 4 significant digits."""
    return {run["placement"]: {"e2e_ms_mean": sig4(run["e2e_ms"]["mean"]),
                               "a2a_tail_ms_p50": sig4(run["a2a_tail_ms"]["p50"]),
                               "compute_skew_max_over_mean": sig4(run["compute_skew"]["max_over_mean"]),
                               "speedup_vs_baseline": sig4(run["speedup_vs_baseline"])}
            for run in results["runs"]}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, yaml_writer, tiny_scenario_template):
    """The tiny scenario run once through the CLI: (scenario path, output folder)."""
    folder = tmp_path_factory.mktemp("tiny")
    scenario = yaml_writer(folder / "tiny.yaml", tiny_scenario_template)
    out = folder / "out"
    assert main(["run", str(scenario), "-o", str(out), "-q"]) == 0
    return scenario, out


# ---------------------------------------------------------------- validate

@pytest.mark.parametrize("path", SCENARIO_FILES, ids=lambda p: p.stem)
def test_validate_shipped_scenarios(path, capsys):
    assert main(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{path}: ok - ") and err == ""


def test_entry_point_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "moesim.cli", "validate", str(SCENARIO_FILES[0])],
                        capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "moesim.cli", "validate", "missing.yaml"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr == "moesim: error: missing.yaml: file not found\n"


# ---------------------------------------------------------------- run

def test_run_writes_every_result_file(tiny_run, capsys):
    scenario, out = tiny_run
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"results.json", "per_gpu_layer.csv", "speedup.png", "gpu_load.png", "a2a_tail.png",
            "timeline.json"} <= names
    assert {f"placements/1x8-h200/{p}.json" for p in POLICIES} <= names
    for png in ("speedup.png", "gpu_load.png", "a2a_tail.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_results_json(tiny_run):
    _, out = tiny_run
    results = json.loads((out / "results.json").read_text())
    assert results["format"] == "moesim.results/1"
    assert results["scenario"] == "tiny" and results["baseline"] == "contiguous"
    assert [r["placement"] for r in results["runs"]] == POLICIES
    for run in results["runs"]:
        assert run["cluster"] == "1x8-h200"
        assert set(run["e2e_ms"]) >= {"mean", "p50", "p99"}
        assert set(run["a2a_tail_ms"]) >= {"p50", "p99", "max"}
        assert run["compute_skew"]["max_over_mean"] >= 1.0
        assert 0 < run["e2e_ms"]["p50"] <= run["e2e_ms"]["p99"]
        assert run["a2a_tail_ms"]["p50"] <= run["a2a_tail_ms"]["p99"] <= run["a2a_tail_ms"]["max"]
        assert run["speedup_vs_baseline"] > 0
        assert run["simulation"]["events"] > 0
    assert results["runs"][0]["speedup_vs_baseline"] == 1.0
    assert results["workload"]["1x8-h200"]["tokens"] == 2 * 8 * 64
    assert results["clusters"][0]["spec"]["gpus_per_node"] == 8


def test_per_gpu_layer_csv(tiny_run):
    _, out = tiny_run
    with open(out / "per_gpu_layer.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(POLICIES) * 2 * 4 * 8  # placements x batches x layers x GPUs
    assert {r["placement"] for r in rows} == set(POLICIES)
    for policy in POLICIES:
        mine = [r for r in rows if r["placement"] == policy]
        # every (token, expert) pick is computed once: 2 batches x 512 tokens x 4 layers x top-2
        assert sum(int(r["tokens"]) for r in mine) == 2 * 512 * 4 * 2
        assert all(float(r["compute_ms"]) >= 0 for r in mine)


def test_timeline_json(tiny_run):
    _, out = tiny_run
    timeline = json.loads((out / "timeline.json").read_text())
    events = timeline["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    assert {e["name"] for e in slices} >= {"dense", "dispatch", "compute", "combine"}
    assert all(e["dur"] > 0 and e["ts"] >= 0 for e in slices)
    assert len({e["pid"] for e in events}) == len(POLICIES)


def test_placements_written_are_loadable(tiny_run):
    _, out = tiny_run
    for policy in POLICIES:
        p = load_placement(out / "placements" / "1x8-h200" / f"{policy}.json")
        validate_placement(p, num_layers=4, num_experts=16, num_ranks=8)


def test_run_twice_gives_byte_identical_results(tiny_run, tmp_path):
    scenario, out = tiny_run
    again = tmp_path / "again"
    assert main(["run", str(scenario), "-o", str(again), "-q", "--no-plots"]) == 0
    assert (again / "results.json").read_bytes() == (out / "results.json").read_bytes()
    assert (again / "per_gpu_layer.csv").read_bytes() == (out / "per_gpu_layer.csv").read_bytes()
    assert not (again / "speedup.png").exists()


def test_run_prints_a_report(tiny_scenario_file, tmp_path, capsys):
    assert main(["run", str(tiny_scenario_file), "-o", str(tmp_path / "o"), "-q", "--no-plots"]) == 0
    out, err = capsys.readouterr()
    assert "== 1x8-h200 ==" in out and "Verdict:" in out
    assert all(p in out for p in POLICIES)
    assert err == ""


def test_run_default_output_folder(tiny_scenario_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(tiny_scenario_file), "-q", "--no-plots"]) == 0
    assert json.loads((tmp_path / "results" / "tiny" / "results.json").read_text())["scenario"] == "tiny"


def test_golden_summary(tiny_run):
    _, out = tiny_run
    got = summary(json.loads((out / "results.json").read_text()))
    if os.environ.get("MOESIM_REGEN_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"regenerated {GOLDEN}")
    assert GOLDEN.is_file(), "golden file missing: run with MOESIM_REGEN_GOLDEN=1 once"
    assert got == json.loads(GOLDEN.read_text())


def test_a_failed_write_leaves_nothing(tiny_scenario_file, tmp_path, monkeypatch):
    """Result files are all or nothing: a failure while plotting leaves no folder and no temporary files, and
    an older run's folder exactly as it was; a folder holding files moesim did not write is refused."""
    from moesim.errors import InputError
    from moesim.report import plots
    from moesim.report.files import write_outputs
    from moesim.study import load_scenario, run_study

    result = run_study(load_scenario(tiny_scenario_file), progress=False)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(plots, "write_all", broken)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(RuntimeError, match="disk full"):
        write_outputs(result, tmp_path / "out")
    assert sorted(tmp_path.iterdir()) == before
    # an older run's folder keeps its files
    out = tmp_path / "keep"
    monkeypatch.undo()
    write_outputs(result, out, plots_on=False)
    old = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    monkeypatch.setattr(plots, "write_all", broken)
    with pytest.raises(RuntimeError):
        write_outputs(result, out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == old
    assert sorted(tmp_path.iterdir()) == sorted([*before, out])
    # a folder holding a file moesim did not write is refused, untouched
    (out / "notes.txt").write_text("mine")
    monkeypatch.undo()
    with pytest.raises(InputError, match="holds notes.txt"):
        write_outputs(result, out, plots_on=False)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    written = write_outputs(result, out)
    assert out / "speedup.png" in written
    assert json.loads((out / "results.json").read_text())["format"] == "moesim.results/1"


# ---------------------------------------------------------------- bad input: exit 2, one line, no output

def trace_file(folder: Path, num_experts: int) -> Path:
    trace = generate_trace(num_layers=4, num_experts=num_experts, top_k=2, num_gpus=8, tokens_per_gpu=4,
                           batches=1, params=SyntheticParams(), rng=np.random.default_rng(0))
    return save_trace(trace, folder / "trace.npz")


def bad_placement_file(folder: Path) -> Path:
    layers = [{"expert_gpus": [[e % 8] for e in range(16)]} for _ in range(4)]
    layers[2]["expert_gpus"][3] = [9]
    path = folder / "p.json"
    path.write_text(json.dumps({"format": "moesim.placement/1", "num_ranks": 8, "layers": layers}))
    return path


def _set(data, **changes):
    for key, value in changes.items():
        data[key] = value


BAD_RUNS = [
    ("malformed yaml", None, "tiny.yaml: line"),
    ("unknown key", lambda d, f: _set(d, colour="red"), "colour: unknown key"),
    ("unknown preset", lambda d, f: d["clusters"][0].update(preset="dgx-x"), "clusters[0].preset"),
    ("negative nic", lambda d, f: d["clusters"][0].update(network={"nic_Gbps": -1}), "nic_Gbps"),
    ("tp", lambda d, f: d["clusters"][0].update(tp=3), "clusters[0].tp"),
    ("unknown policy", lambda d, f: d["placements"].append("magic"), "placements[4].policy"),
    ("baseline", lambda d, f: _set(d, baseline="magic"), "baseline"),
    ("trace missing", lambda d, f: _set(d, workload={"trace": {"file": "none.npz"}}), "workload.trace.file"),
    ("trace mismatch", lambda d, f: _set(d, workload={"trace": {"file": str(trace_file(f, 32))}}),
     "meta.num_experts"),
    ("placement gpu out of range", lambda d, f: d["placements"].append({"file": str(bad_placement_file(f))}),
     "layers[2].expert_gpus[3]"),
    ("experts do not fit", lambda d, f: d["model"].update(d_model=16384, d_ff=65536, num_layers=40), "clusters[0]"),
    pytest.param("policy option type", lambda d, f: d["placements"].append({"policy": "random", "seed": "x",
                                                                           "name": "r2"}),
                 "placements[4]"),
    pytest.param("unsatisfiable affinity",
                 lambda d, f: d["workload"]["synthetic"].update(affinity=1.0, affinity_fanout=1, tokens_per_gpu=1),
                 "workload.synthetic"),
]


@pytest.mark.parametrize("case, change, where", BAD_RUNS,
                         ids=[c.values[0] if hasattr(c, "values") else c[0] for c in BAD_RUNS])
def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path, tiny_scenario_data, yaml_writer, capsys,
                                                       case, change, where):
    scenario = tmp_path / "tiny.yaml"
    if change is None:
        scenario.write_text("name: tiny\nclusters: [hgx-h200\n")
    else:
        change(tiny_scenario_data, tmp_path)
        yaml_writer(scenario, tiny_scenario_data)
    before = sorted(tmp_path.iterdir())
    out = tmp_path / "out"
    for argv in (["validate", str(scenario)], ["run", str(scenario), "-o", str(out), "-q"]):
        if argv[0] == "validate" and case in ("policy option type", "unsatisfiable affinity"):
            continue  # only found when the run is prepared
        code = main(argv)
        stdout, stderr = capsys.readouterr()
        assert code == 2, (argv, stderr)
        lines = stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("moesim: error: "), stderr
        assert where in lines[0]
        assert stdout == ""
        assert not out.exists()
        assert sorted(tmp_path.iterdir()) == before  # nothing written anywhere, not even a temporary folder


def test_missing_scenario_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "none.yaml"), "-o", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"moesim: error: {tmp_path / 'none.yaml'}: file not found\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, expected", [
    (["cluster", "list", "--bogus"], "unrecognized arguments: --bogus (moesim --help lists the options)"),
    (["nope"], "argument command: invalid choice: 'nope' (choose from {commands}) (moesim --help lists the options)"),
    (["cluster", "lst"], "argument action: invalid choice: 'lst' (choose from 'show', 'list') (moesim cluster --help "
                         "lists the options)"),
    (["run"], "the following arguments are required: scenario (moesim run --help lists the options)"),
])
def test_a_bad_flag_is_one_line_naming_the_help_to_read(argv, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    commands = err.partition("(choose from ")[2].partition(")")[0]  # every command, whichever exist
    assert "'run', 'validate', 'place'" in commands or "{commands}" not in expected
    assert (out, err) == ("", f"moesim: error: {expected.format(commands=commands)}\n")


def test_running_out_of_memory_is_one_line_and_exit_2(monkeypatch, capsys):
    import moesim.cli.cluster as cluster_cli

    def huge(name):
        raise MemoryError

    monkeypatch.setattr(cluster_cli, "preset", huge)
    assert main(["cluster", "list"]) == 2
    assert capsys.readouterr() == ("", "moesim: error: ran out of memory; the input is larger than this machine (or "
                                       "MOESIM_MAX_MEMORY_GB) allows\n")


def test_output_into_a_closed_pipe_is_not_an_error(monkeypatch, capsys):
    """``moesim cluster list | head -1``: the reader leaves; the rest of the output goes to /dev/null, exit 0."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    with os.fdopen(write_end, "w", buffering=1) as pipe:  # line-buffered: the first line meets the closed pipe
        monkeypatch.setattr(sys, "stdout", pipe)
        assert main(["cluster", "list"]) == 0
        assert os.path.samestat(os.fstat(write_end), os.stat(os.devnull))
        monkeypatch.undo()
    assert capsys.readouterr() == ("", "")


def test_python_dash_m_moesim_cli_is_the_console_script(monkeypatch, capsys):
    import runpy

    monkeypatch.setattr(sys, "argv", ["moesim", "cluster", "list"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("moesim.cli", run_name="__main__")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert main(["cluster", "list"]) == 0 and capsys.readouterr().out == out != ""


# ---------------------------------------------------------------- cluster

def test_cluster_list(capsys):
    assert main(["cluster", "list"]) == 0
    out = capsys.readouterr().out
    from moesim.hardware import preset_names

    assert [line.split()[0] for line in out.splitlines()] == preset_names()


def test_cluster_show(capsys):
    assert main(["cluster", "show", "hgx-h200"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("hgx-h200: 1 node(s) x 8 GPUs = 8 GPUs")
    assert "H200-SXM: 989 TFLOP/s" in out and "450 GB/s per GPU per direction" in out
    assert "path gpu0 -> gpu7: gpu0 -> nvsw0 -> gpu7 (1.7 us)" in out


def test_cluster_show_with_overrides_and_file(tmp_path, capsys):
    assert main(["cluster", "show", "hgx-h200", "--set", "nodes=2", "--set", "network.nic_Gbps=200"]) == 0
    out = capsys.readouterr().out
    assert "2 node(s) x 8 GPUs = 16 GPUs" in out and "200 Gb/s NIC" in out
    assert "gpu0 -> nic0 -> leaf0 -> spine -> leaf7 -> nic15 -> gpu15" in out
    path = tmp_path / "c.yaml"
    path.write_text("preset: dgx-a100\nnodes: 2\n")
    assert main(["cluster", "show", str(path)]) == 0
    assert "16 GPUs" in capsys.readouterr().out


@pytest.mark.parametrize("argv, where", [
    (["cluster", "show", "dgx-x"], "unknown cluster preset 'dgx-x'"),
    (["cluster", "show", "hgx-h200", "--set", "nodes=0"], "hgx-h200: nodes:"),
    (["cluster", "show", "hgx-h200", "--set", "nodes"], "KEY=VALUE"),
    (["cluster", "show", "hgx-h200", "--set", "gpu.tflops=1"], "gpu.tflops: unknown key"),
    (["cluster", "show"], "needs a preset name"),
    (["cluster", "show", "missing.yaml"], "missing.yaml: file not found"),
])
def test_cluster_show_bad_input(argv, where, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moesim: error: ") and where in err, err


@pytest.mark.parametrize("content", ["preset: dgx-x\nnodes: 2\n", "- nodes: 2\n"],
                         ids=["unknown-preset", "not-a-mapping"])
def test_cluster_file_bad_input(tmp_path, capsys, content):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    assert main(["cluster", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"moesim: error: {path}")


# ---------------------------------------------------------------- place

def test_place_writes_a_loadable_placement(tiny_scenario_file, tmp_path, capsys):
    out = tmp_path / "sub" / "greedy.json"
    assert main(["place", str(tiny_scenario_file), "--policy", "greedy", "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    p = load_placement(out)
    assert p.policy == "greedy" and p.num_ranks == 8
    validate_placement(p, num_layers=4, num_experts=16, num_ranks=8)
    assert (p.copies_per_gpu() == 2).all()
    # and it can be used as a placement file in a scenario
    assert main(["place", str(tiny_scenario_file), "--policy", "random", "--set", "seed=5", "-o",
                 str(tmp_path / "r.json")]) == 0
    assert load_placement(tmp_path / "r.json").info == {"seed": 5}


def test_place_list(capsys):
    assert main(["place", "--list"]) == 0
    names = capsys.readouterr().out.split()
    assert set(names) >= set(POLICIES) and names == sorted(names)


@pytest.mark.parametrize("extra, where", [
    (["--policy", "magic"], "unknown policy 'magic'"),
    (["--policy", "greedy", "--cluster", "nope"], "no cluster 'nope'"),
    (["--policy", "greedy", "--set", "seed=1"], "no option 'seed'"),
    (["--policy", "random", "--set", "seed"], "KEY=VALUE"),
    (["--policy", "random", "--set", "seed=-1"], "--set seed: "),
])
def test_place_bad_input(tiny_scenario_file, tmp_path, capsys, extra, where):
    out = tmp_path / "p.json"
    assert main(["place", str(tiny_scenario_file), "-o", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moesim: error: ") and where in err, err
    assert not out.exists()


def test_place_needs_its_arguments(capsys):
    assert main(["place"]) == 2
    assert "needs SCENARIO, --policy and -o" in capsys.readouterr().err


def test_place_reports_the_solve(tiny_scenario_file, tmp_path, capsys):
    """An optimising policy's gap and solve time are printed with the placement it wrote."""
    out = tmp_path / "p.json"
    assert main(["place", str(tiny_scenario_file), "--policy", "ilp", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    info = json.loads(out.read_text())["info"]
    assert f"gap {info['gap'] * 100:.2f}% ({info['status']}" in text


def test_validate_catches_replicas_that_do_not_fit_in_memory(tmp_path, capsys):
    """validate checks what run would reject: redundant experts beyond the GPUs' memory."""
    path = tmp_path / "big.yaml"
    path.write_text(
        "name: big\nclusters: [{name: c, preset: hgx-h200, nodes: 4}]\n"
        "model: {num_layers: 58, num_experts: 256, top_k: 8, d_model: 7168, d_ff: 2048, dtype_bytes: 1}\n"
        "workload: {synthetic: {tokens_per_gpu: 8, batches: 1}}\n"
        "placements: [contiguous, {policy: greedy, redundant_experts: 2048}]\nbaseline: contiguous\n")
    for cmd in (["validate", str(path)], ["run", str(path), "-o", str(tmp_path / "out")]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert "placements.greedy.redundant_experts" in err and "at most 1152" in err, err
    assert not (tmp_path / "out").exists()


def test_outputs_get_the_usual_file_mode(tmp_path):
    """Files are written atomically but readable as open() would make them (not mkstemp's 0600)."""
    from moesim.fileio import atomic_write

    umask = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "x.txt", lambda fh: fh.write("x"))
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_calibrate_tells_its_progress_on_stderr_only(tmp_path, capsys, monkeypatch):
    """The fit's iterations advance a bar on stderr (shown past PROGRESS_DELAY_S: 0 here), none with -q; the
    cluster YAML is byte for byte the same either way."""
    import moesim.cli.common as common
    from moesim.calibration import calibrate, load_bench
    from moesim.calibration.fit import calibration_steps

    host2 = REPO / "benchmarks/validation/h200_host2"
    data = load_bench([host2 / "a2a_2.json", host2 / "expert_ffn.json"])
    told: list[int] = []
    calibrate(data, iters=30, progress=told.append)
    assert sum(told) == calibration_steps(data, iters=30) == 60 and len(told) > 2
    monkeypatch.setattr(common, "PROGRESS_DELAY_S", 0.0)
    argv = ["calibrate", str(host2 / "expert_ffn.json"), "--preset", "hgx-h200", "-o"]  # the quicker fit
    assert main([*argv, str(tmp_path / "shown.yaml")]) == 0
    shown_out, shown_err = capsys.readouterr()
    assert "fitting hgx-h200" in shown_err and "iteration" in shown_err, shown_err
    assert main([*argv, str(tmp_path / "quiet.yaml"), "-q"]) == 0
    quiet_out, quiet_err = capsys.readouterr()
    assert quiet_err == "" and (tmp_path / "shown.yaml").read_bytes() == (tmp_path / "quiet.yaml").read_bytes()
    assert shown_out.replace("shown.yaml", "quiet.yaml") == quiet_out


def test_place_shows_progress_as_run_does(tiny_scenario_data, yaml_writer, tmp_path, capsys):
    """moesim place prepares the cluster as run does (the workload, the costs, the policy: a large one takes
    minutes): the same bar on stderr unless -q or the scenario's engine.progress says no; the file is the same."""
    scenario = yaml_writer(tmp_path / "s.yaml", {**tiny_scenario_data, "engine": {"progress": True}})
    assert main(["place", str(scenario), "--policy", "greedy", "-o", str(tmp_path / "shown.json")]) == 0
    assert "preparing" in capsys.readouterr().err
    assert main(["place", str(scenario), "--policy", "greedy", "-o", str(tmp_path / "quiet.json"), "-q"]) == 0
    assert capsys.readouterr().err == ""
    assert (tmp_path / "shown.json").read_bytes() == (tmp_path / "quiet.json").read_bytes()
