"""Grid sweeps (moesim sweep --grid / a sweep: section): keys into the scenario, validated points, local worker
processes, resuming after a kill, failing points, Ray (skipped without it), and the merged files and plots."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from moesim.cli import main
from moesim.errors import InputError
from moesim.fileio import is_matplotlib_png
from moesim.study.grid import apply_value, load_grid, merge_axes, parse_grid_option, section_axes
from moesim.study.sweep import point_rows, run_points

ROOT = Path(__file__).resolve().parents[1]

# a small study: 2 MoE layers of Qwen3-30B-A3B, about a second per point on one core
SMALL = {
    "name": "small",
    "clusters": [{"name": "h200", "preset": "hgx-h200"}],
    "model": {"preset": "qwen3-30b-a3b", "num_layers": 2},
    "workload": {"synthetic": {"tokens_per_gpu": 256, "batches": 2, "profile_batches": 1, "zipf_alpha": 0.8,
                               "seed": 3}},
    "placements": ["contiguous", "greedy", {"policy": "eplb", "redundant_experts": 16}],
    "baseline": "contiguous",
}


def scenario_file(tmp_path: Path, sweep: dict | None = None, **changes) -> Path:
    data = {**SMALL, **changes}
    if sweep is not None:
        data["sweep"] = sweep
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def merged(folder: Path) -> tuple[bytes, bytes]:
    return (folder / "sweep.json").read_bytes(), (folder / "sweep.csv").read_bytes()


# ---------------------------------------------------------------- keys into the scenario


def test_shorthand_keys_write_where_they_say():
    data = {"clusters": ["hgx-h200", {"name": "b", "preset": "hgx-h200"}],
            "model": "qwen3-30b-a3b",
            "workload": {"synthetic": {"tokens_per_gpu": 8}},
            "placements": ["contiguous", {"policy": "greedy", "redundant_experts": 0}, {"name": "e", "policy": "eplb"}]}
    apply_value(data, "cluster.nodes", 4, "f")
    assert data["clusters"] == [{"preset": "hgx-h200", "nodes": 4}, {"name": "b", "preset": "hgx-h200", "nodes": 4}]
    apply_value(data, "clusters[1].network.nic_Gbps", 200, "f")
    assert data["clusters"][1]["network"] == {"nic_Gbps": 200}
    apply_value(data, "workload.tokens_per_gpu", 4096, "f")
    assert data["workload"]["synthetic"]["tokens_per_gpu"] == 4096
    apply_value(data, "workload.kv_len", 2048, "f")  # the workload's own keys stay there, every one of them
    assert data["workload"]["kv_len"] == 2048
    for key, value in (("prefix_len", 1024), ("phase", "serve"), ("speculative", {"draft_tokens": 1})):
        apply_value(data, f"workload.{key}", value, "f")
        assert data["workload"][key] == value and key not in data["workload"]["synthetic"]
    apply_value(data, "placement.redundant_experts", 32, "f")  # greedy and eplb take it, contiguous does not
    assert data["placements"] == ["contiguous", {"policy": "greedy", "redundant_experts": 32},
                                  {"name": "e", "policy": "eplb", "redundant_experts": 32}]
    apply_value(data, "placements[e].redundant_experts", 8, "f")
    assert data["placements"][2]["redundant_experts"] == 8
    apply_value(data, "model.num_layers", 3, "f")
    assert data["model"] == {"preset": "qwen3-30b-a3b", "num_layers": 3}
    apply_value(data, "engine.a2a", "hierarchical", "f")
    assert data["engine"] == {"a2a": "hierarchical"}


@pytest.mark.parametrize("key, message", [
    ("placement.no_such_option", "no placement of the scenario takes the option 'no_such_option'"),
    ("placements[nobody].seed", "no entry named 'nobody'"),
    ("clusters[5].nodes", "index 5 is past the list's 1 entries"),
    ("model.num_layers.x", "'x' is inside something that is not a mapping"),
])
def test_a_key_that_leads_nowhere_is_named(key, message):
    data = {"clusters": ["hgx-h200"], "model": {"num_layers": 2}, "placements": ["contiguous"],
            "workload": {"synthetic": {}}}
    with pytest.raises(InputError) as err:
        apply_value(data, key, 1, f"--grid {key}")
    assert err.value.field == f"--grid {key}" and message in err.value.detail


def test_grid_options_read_values_as_yaml_and_replace_the_section():
    axis = parse_grid_option("workload.synthetic.zipf_alpha=0, 0.5,1e-1")
    assert axis.values == (0, 0.5, 0.1)
    assert parse_grid_option("engine.a2a=direct,hierarchical").values == ("direct", "hierarchical")
    section = section_axes({"cluster.nodes": [1, 2], "workload.tokens_per_gpu": [1]}, "s.yaml")
    axes = merge_axes(section, [parse_grid_option("cluster.nodes=4,8"), parse_grid_option("model.num_layers=2")])
    assert [(a.key, a.values) for a in axes] == [("cluster.nodes", (4, 8)), ("workload.tokens_per_gpu", (1,)),
                                                 ("model.num_layers", (2,))]
    for bad in ("nodes", "=1", "a.b=", "a..b=1", "a=1,,2"):
        with pytest.raises(InputError):
            parse_grid_option(bad)
    with pytest.raises(InputError, match="given twice"):
        merge_axes([], [parse_grid_option("a=1"), parse_grid_option("a=2")])


def test_points_are_every_combination_validated_and_keyed_by_their_scenario(tmp_path):
    path = scenario_file(tmp_path, {"cluster.nodes": [1, 2], "workload.tokens_per_gpu": [128, 256]})
    axes, points = load_grid(path, ["workload.synthetic.zipf_alpha=0.8"])
    assert [p.values for p in points][:2] == [
        (("cluster.nodes", 1), ("workload.tokens_per_gpu", 128), ("workload.synthetic.zipf_alpha", 0.8)),
        (("cluster.nodes", 1), ("workload.tokens_per_gpu", 256), ("workload.synthetic.zipf_alpha", 0.8))]
    assert [p.scenario.clusters[0].spec.num_gpus for p in points] == [8, 8, 16, 16]
    assert len({p.digest for p in points}) == 4
    # the digest is of the resolved scenario: the same point from another file in another folder is the same
    other = tmp_path / "elsewhere"
    other.mkdir()
    _, again = load_grid(scenario_file(other, {"cluster.nodes": [2, 1]}), ["workload.tokens_per_gpu=128,256"])
    assert {p.digest for p in again} == {p.digest for p in points}
    # a value that is the scenario's own gives the same point once
    _, dup = load_grid(path, ["cluster.nodes=1,1", "workload.tokens_per_gpu=256"])
    assert len(dup) == 1


def test_keys_joined_by_a_comma_move_together():
    from moesim.study.grid import sweep_points

    axes, points = sweep_points(SMALL, {"cluster.nodes, placement.redundant_experts": [[1, 8], [2, 16]],
                                        "workload.tokens_per_gpu": [64, 128]})
    assert len(points) == 4 and axes[0].keys == ("cluster.nodes", "placement.redundant_experts")
    assert points[2].values == (("cluster.nodes", 2), ("placement.redundant_experts", 16),
                                ("workload.tokens_per_gpu", 64))
    eplb = next(p for p in points[2].scenario.placements if p.policy == "eplb")
    assert points[2].scenario.clusters[0].spec.num_gpus == 16 and eplb.options["redundant_experts"] == 16
    with pytest.raises(InputError, match="take lists of 2 values"):
        sweep_points(SMALL, {"cluster.nodes, placement.redundant_experts": [[1, 8], 2]})


def test_a_bad_point_is_one_line_naming_the_field_and_writes_nothing(tmp_path, capsys):
    path = scenario_file(tmp_path, {"cluster.nodes": [1, 0]})
    out = tmp_path / "out"
    rc, _, err = cli(["sweep", str(path), "-o", str(out), "-q"], capsys)
    assert rc == 2 and not out.exists()
    assert err == (f"moesim: error: {path}: clusters[0].nodes: Input should be greater than or equal to 1 (got 0) "
                   "(sweep point cluster.nodes=0)\n")
    rc, _, err = cli(["sweep", str(path), "-o", str(out), "--grid", "cluster.nodez=1"], capsys)
    assert rc == 2 and "clusters[0].nodez: unknown key" in err and not out.exists()
    (tmp_path / "plain").mkdir()
    rc, _, err = cli(["sweep", str(scenario_file(tmp_path / "plain")), "-o", str(out)], capsys)
    assert rc == 2 and "nothing to sweep: give --grid KEY=V1,V2,... or a 'sweep:' section" in err
    rc, _, err = cli(["sweep", str(path), "--grid", "cluster.nodes=1", "--redundant", "0,16", "-o", str(out)], capsys)
    assert rc == 2 and "--grid: is for a grid sweep" in err
    rc, _, err = cli(["sweep", str(path), "--jobs", "0", "-o", str(out)], capsys)
    assert rc == 2 and "--jobs: must be from 1" in err
    rc, _, err = cli(["sweep", str(path), "--grid", "cluster.nodes=1,2", "--heatmap", "cluster.nodes,model.num_layers",
                      "-o", str(out)], capsys)
    assert rc == 2 and "--heatmap" in err and not out.exists()


def test_a_scenario_with_a_sweep_section_still_runs_as_written(tmp_path, capsys):
    path = scenario_file(tmp_path, {"cluster.nodes": [1, 2]})
    rc, out, _ = cli(["validate", str(path)], capsys)
    assert rc == 0 and "h200 (8 GPUs, EP8)" in out
    bad = scenario_file(tmp_path, {"cluster.nodes": 2})
    rc, _, err = cli(["validate", str(bad)], capsys)
    assert rc == 2 and "sweep.cluster.nodes: must be a non-empty list of values" in err


# ---------------------------------------------------------------- running, in parallel and resumed


def test_jobs_2_equals_jobs_1_and_a_failing_point_stops_nothing(tmp_path, capsys):
    """eplb's 16 redundant experts do not fill 4 nodes' 32 GPUs equally: that point fails, with its error, and
    the others finish; one process or two give the same bytes."""
    path = scenario_file(tmp_path, {"cluster.nodes": [1, 4], "workload.synthetic.zipf_alpha": [0.4, 1.0]})
    results = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        rc, stdout, err = cli(["sweep", str(path), "-o", str(out), "--jobs", str(jobs), "-q"], capsys)
        assert rc == 1, err
        assert stdout.count("failed: ") == 2 and "redundant must fill the 32 GPUs" in stdout
        results[jobs] = merged(out)
        assert len(list((out / "points").glob("*.json"))) == 4
    assert results[1] == results[2]
    data = json.loads(results[1][0])
    assert data["format"] == "moesim.grid/1" and len(data["points"]) == 4
    assert [f["point"] for f in data["failures"]] == [2, 3]
    rows = data["rows"]
    assert [(r["point"], r["placement"]) for r in rows][:3] == [(0, "contiguous"), (0, "greedy"), (0, "eplb")]
    assert {r["gpus"] for r in rows} == {8}
    assert all(r["speedup_vs_baseline"] == 1.0 for r in rows if r["placement"] == "contiguous")
    # the rows are the study's own metrics: the same point run alone gives them
    _, points = load_grid(path)
    alone = point_rows(points[1].scenario)
    assert [{k: r[k] for k in alone[0]} for r in rows if r["point"] == 1] == alone


def test_resume_after_a_kill_gives_the_same_merged_table(tmp_path):
    """SIGKILL the sweep after two of its six points: the rerun runs only the others and writes the bytes an
    uninterrupted run writes."""
    path = scenario_file(tmp_path, {"workload.synthetic.seed": [1, 2, 3, 4, 5, 6]},
                         placements=["contiguous", "greedy"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "moesim.cli", "sweep", str(path), "--jobs", "1", "-q"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*command, "-o", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((killed / "points").glob("*.json"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((killed / "points").glob("*.json")))
    assert 2 <= done < 6 and not (killed / "sweep.json").exists()
    resumed = subprocess.run([*command, "-o", str(killed)], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{done} of 6 points already done" in resumed.stderr
    assert f"({done} done before, {6 - done} run here, 0 failed)" in resumed.stdout
    whole = tmp_path / "whole"
    straight = subprocess.run([*command, "-o", str(whole)], env=env, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr
    assert merged(killed) == merged(whole)
    assert not [p for p in killed.rglob("*") if ".tmp" in p.name]  # the killed write left no litter behind


def test_plots_and_folder_rules(tmp_path, capsys):
    path = scenario_file(tmp_path, {"cluster.nodes": [1, 2], "workload.synthetic.zipf_alpha": [0.4, 1.0]},
                         placements=["contiguous", "greedy"])
    out = tmp_path / "out"
    rc, stdout, _ = cli(["sweep", str(path), "-o", str(out), "--jobs", "1", "-q"], capsys)
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["heatmap.png", "points", "speedup_vs_gpus.png", "sweep.csv",
                                                     "sweep.json"]
    assert all(is_matplotlib_png(out / n) for n in ("heatmap.png", "speedup_vs_gpus.png"))
    # a rerun finds every point done and rewrites the same table
    before = merged(out)
    rc, stdout, err = cli(["sweep", str(path), "-o", str(out), "-q"], capsys)
    assert rc == 0 and "4 of 4 points already done" in err and merged(out) == before
    # a folder holding files moesim did not write is refused
    (out / "notes.txt").write_text("mine")
    rc, _, err = cli(["sweep", str(path), "-o", str(out), "-q"], capsys)
    assert rc == 2 and "notes.txt, which is not one of moesim sweep --grid's outputs" in err


def test_ray_missing_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    _, points = load_grid(scenario_file(tmp_path, {"cluster.nodes": [1]}))
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(InputError) as err:
        run_points(points, backend="ray")
    assert err.value.field == "--backend ray" and '.[ray]' in err.value.detail


# ---------------------------------------------------------------- Ray (a local instance, 2 CPUs)


def _kill_one_ray_task(stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL the first Ray worker seen running a point: Ray titles a worker ray::run_one only while it runs
    the task (ray::IDLE otherwise), so a worker seen with that title is mid-point."""
    import psutil  # a dependency of Ray
    while not stop.is_set() and not killed:
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if " ".join(proc.info["cmdline"] or []).startswith("ray::run_one"):
                try:
                    os.kill(proc.info["pid"], signal.SIGKILL)
                except OSError:  # it finished and exited meanwhile: look again
                    continue
                killed.append(proc.info["pid"])
                return
        time.sleep(0.01)


@pytest.mark.ray
def test_ray_gives_the_same_results_with_a_worker_killed_mid_point(tmp_path):
    pytest.importorskip("ray")
    # points of several seconds each, so that the killer, however loaded the machine, finds one running
    workload = {"synthetic": {**SMALL["workload"]["synthetic"], "tokens_per_gpu": 1024, "batches": 3}}
    path = scenario_file(tmp_path, {"workload.synthetic.seed": [1, 2, 3, 4]}, placements=["contiguous", "greedy"],
                         workload=workload)
    _, points = load_grid(path)
    local = run_points(points, jobs=1)
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_one_ray_task, args=(stop, killed))
    killer.start()
    try:
        remote = run_points(points, jobs=2, backend="ray")
    finally:
        stop.set()
        killer.join()
    assert killed, "no Ray worker was seen running a point"
    assert [o.error for o in remote] == [None] * 4
    assert [o.rows for o in remote] == [o.rows for o in local]


def test_the_default_folder_lies_in_the_runs_and_a_run_keeps_it(tmp_path, capsys, monkeypatch):
    """moesim sweep --grid writes to OUTPUT/grid by default; a later moesim run replaces its own files and
    carries the grid folder over (as it does moesim sweep's sweep/)."""
    monkeypatch.chdir(tmp_path)
    path = scenario_file(tmp_path, {"workload.synthetic.seed": [1, 2]}, placements=["contiguous", "greedy"])
    rc, _, _ = cli(["sweep", "small.yaml", "--jobs", "1", "-q"], capsys)
    grid = tmp_path / "results" / "small" / "grid"
    assert rc == 0 and (grid / "sweep.json").is_file()
    before = merged(grid)
    rc, _, err = cli(["run", str(path), "-q", "--no-plots"], capsys)
    assert rc == 0, err
    assert (tmp_path / "results" / "small" / "results.json").is_file() and merged(grid) == before


def test_worker_processes_get_their_share_of_threads(monkeypatch):
    """Spawned sweep workers inherit a cap on their threads (the sampler's, BLAS's): the CPUs over the jobs; the
    user's own settings are kept and nothing is left behind."""
    import os

    from moesim.study.sweep import _thread_share
    from moesim.traces import synthetic

    for name in ("MOESIM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "7")
    cpus = len(os.sched_getaffinity(0))
    with _thread_share(2):
        assert os.environ["MOESIM_THREADS"] == os.environ["OMP_NUM_THREADS"] == str(max(1, cpus // 2))
        assert os.environ["MKL_NUM_THREADS"] == "7"
        assert synthetic._workers() == max(1, min(cpus // 2, 4))
    assert "MOESIM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ
    assert os.environ["MKL_NUM_THREADS"] == "7"
    monkeypatch.setenv("MOESIM_THREADS", "1")
    assert synthetic._workers() == 1
