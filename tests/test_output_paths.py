"""Where moesim writes: names never reach outside the output folder, output paths are checked before the work,
older outputs are replaced whole or left alone, Ctrl-C leaves no traceback and no partial output, and writing
plots never changes Matplotlib's backend. Every scenario, trace and folder is made here, at run time.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from moesim import fileio, scratch
from moesim.cli import main
from moesim.fileio import NAME_BYTES, safe_name, safe_names
from moesim.loaders import dump_yaml
from moesim.traces import save_trace
from moesim.traces.format import Trace, TraceMeta

REPO = Path(__file__).resolve().parents[1]
H100_ATTENTION = REPO / "benchmarks/validation/attention_h100/attention_h100.json"
UNWRITABLE = Path("/proc/moesim-test/out")  # not writable even as root

# the smallest scenario with two placements: 2 GPUs, 2 layers, 8 tokens per GPU, one batch
SMALL: dict[str, Any] = {
    "name": "small",
    "clusters": [{"name": "c", "preset": "hgx-h200", "nodes": 1, "gpus_per_node": 2}],
    "model": {"name": "m", "num_layers": 2, "num_experts": 4, "top_k": 2, "d_model": 64, "d_ff": 128},
    "workload": {"synthetic": {"tokens_per_gpu": 8, "batches": 1, "seed": 1}},
    "placements": [{"policy": "contiguous", "name": "contiguous"}, {"policy": "round_robin", "name": "round_robin"}],
    "engine": {"progress": False},
}
# with a rebalance section, for moesim sweep
REBALANCED: dict[str, Any] = {
    "name": "rb",
    "clusters": [{"preset": "hgx-h200", "nodes": 1, "gpus_per_node": 2, "name": "c"}],
    "model": {"num_layers": 2, "num_experts": 8, "top_k": 2, "d_model": 64, "d_ff": 64},
    "workload": {"synthetic": {"tokens_per_gpu": 16, "batches": 3, "zipf_alpha": 1.2, "seed": 1,
                               "drift_swaps_per_batch": 2}},
    "placements": ["contiguous", {"policy": "eplb", "redundant_experts": 2, "name": "eplb2"}],
    "rebalance": {"policy": "eplb2", "every_batches": 1, "window_batches": 1},
    "engine": {"progress": False},
}


def write_scenario(path: Path, data: dict[str, Any]) -> Path:
    """``data`` as YAML that moesim reads back as written (a name such as ``0E0`` is quoted: moesim reads the
    plain one as a number)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_yaml(data, sort_keys=False))
    return path


def small_trace(path: Path) -> Path:
    rng = np.random.default_rng(0)
    ex = np.argsort(rng.random((64, 3, 8)), axis=2)[:, :, :2].astype(np.int16)
    save_trace(Trace(experts=ex, meta=TraceMeta(num_experts=8, num_layers=3, top_k=2)), path)
    return path


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under ``root``: files with their bytes, folders as None."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, path: Path | str, *words: str) -> None:
    assert rc == 2, err
    assert err.startswith(f"moesim: error: {path}: ") and err.endswith("\n") and err.count("\n") == 1, err
    for w in words:
        assert w in err, err


def never(what: str) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"{what} ran although the output path is unusable")
    return fail


# ---------------------------------------------------------------- safe file names

NO_NUL_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=60)


@settings(max_examples=300, deadline=None)
@given(NO_NUL_TEXT)
def test_safe_name_is_one_harmless_component(name):
    s = safe_name(name)
    assert s and s not in (".", "..") and not s.startswith(".") and not s.endswith((".", " "))
    assert not set(s) & set('/\\\x00:*?"<>|\n\r\t')
    assert Path(s).name == s and len(Path(s).parts) == 1
    assert len(s.encode("utf-8")) <= NAME_BYTES
    assert safe_name(s) == s


@pytest.mark.parametrize("name", ["greedy", "eplb R=16", "hgx-h200-2x8", "ilp (gap 1)", "1x8-h200",
                                  "contiguous", "mixtral_8x7b", "名前"])
def test_readable_names_stay_as_they_are(name):
    assert safe_name(name) == name


@pytest.mark.parametrize("name, safe", [("../../etc/passwd", "___.._etc_passwd"), ("/abs/x", "_abs_x"),
                                        ("..", "__"), ("", "_"), ("a/b", "a_b"), ("con", "_con"),
                                        ("a\nb", "a_b"), ("C:\\x", "C__x")])
def test_unsafe_names_become_safe(name, safe):
    assert safe_name(name) == safe


@settings(max_examples=200, deadline=None)
@given(st.lists(NO_NUL_TEXT, max_size=8, unique=True))
def test_safe_names_are_distinct_and_deterministic(names):
    files = safe_names(names)
    assert set(files) == set(names)
    assert len({f.casefold() for f in files.values()}) == len(names)  # distinct, also on case-blind disks
    assert safe_names(names) == files
    for n in names:
        if safe_name(n) == n and sum(m.casefold() == n.casefold() for m in names) == 1:
            assert files[n] == n  # a name safe as it is keeps its own file name, whatever the others


def test_colliding_names_get_distinct_files():
    assert safe_names(["a/b", "a_b", "a:b"]) == {"a_b": "a_b", "a/b": "a_b-2", "a:b": "a_b-3"}


# ---------------------------------------------------------------- names never reach outside -o

@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    return tmp_path_factory.mktemp("names")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_names_never_write_outside_the_output_folder(sandbox, capsys, data):
    """For any scenario, cluster and placement names (``/``, ``..``, absolute paths, any NUL-free unicode),
    every file moesim run writes lies under its output folder (-o, or the default results/NAME)."""
    prefixes = st.sampled_from(["", "/", "../", "../../../../../../", "./", "..", f"{sandbox}/", f"{sandbox}/../",
                                "a/../../", "..\\..\\", "~/", "results/", "out/../"])
    name = st.builds(lambda p, t: p + t, prefixes, st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20))
    scenario_name, cluster, first, second = (data.draw(name, label=k) for k in ("scenario", "cluster", "p1", "p2"))
    default_output = data.draw(st.booleans(), label="default output folder")
    for p in sandbox.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    cwd = sandbox / "a" / "b" / "c" / "d" / "e" / "f" / "cwd"  # so that ../ names stay inside the sandbox
    doc = {**SMALL, "name": scenario_name, "clusters": [{**SMALL["clusters"][0], "name": cluster}],
           "placements": [{"policy": "contiguous", "name": first}, {"policy": "round_robin", "name": second}]}
    scenario = write_scenario(cwd / "s.yaml", doc)
    before = snapshot(sandbox)
    here = os.getcwd()
    os.chdir(cwd)
    try:
        rc, _, err = cli(["run", "s.yaml", "-q", "--no-plots", *([] if default_output else ["-o", "out"])], capsys)
    finally:
        os.chdir(here)
    new = {k for k, v in snapshot(sandbox).items() if k not in before and v is not None}
    event(f"exit status {rc}")
    if rc == 2:  # a name the scenario loader refuses: one line, nothing written
        assert err.count("\n") == 1 and not new, err
        return
    assert rc == 0, err
    if default_output:
        (out,) = (cwd / "results").iterdir()
        assert out.name == safe_name(yaml.safe_load(scenario.read_text())["name"] or "s")
    else:
        out = cwd / "out"
    prefix = out.relative_to(sandbox).as_posix() + "/"
    assert new and all(k.startswith(prefix) for k in new), sorted(new)
    loaded = yaml.safe_load(scenario.read_text())  # the names as the scenario holds them: shown unchanged
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["placement"] for r in runs] == [p["name"] or p["policy"] for p in loaded["placements"]]
    assert {r["cluster"] for r in runs} == {loaded["clusters"][0]["name"]}


def test_hostile_names_in_plots_and_files(tmp_path, capsys):
    """Names with mathtext, newlines and path parts draw as typed and land in distinct safe files."""
    doc = {**SMALL, "name": "$\\frac$/..", "clusters": [{**SMALL["clusters"][0], "name": "../up\nline"}],
           "placements": [{"policy": "contiguous", "name": "$\\alpha_{"},
                          {"policy": "round_robin", "name": "$_alpha_{"}]}
    scenario = write_scenario(tmp_path / "s.yaml", doc)
    rc, out, err = cli(["run", scenario, "-q", "-o", tmp_path / "out"], capsys)
    assert rc == 0, err
    placements = tmp_path / "out" / "placements"
    files = sorted(p.relative_to(placements).as_posix() for p in placements.rglob("*.json"))
    assert files == ["___up_line/__alpha__-2.json", "___up_line/__alpha__.json"]  # distinct, in the given order
    assert "placement written as placements/___up_line/__alpha__.json" in out
    assert (tmp_path / "out" / "speedup.png").stat().st_size > 0


def test_default_output_folder_of_an_unsafe_scenario_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_scenario(tmp_path / "s.yaml", {**SMALL, "name": "../../../escaped"})
    rc, _, err = cli(["run", "s.yaml", "-q", "--no-plots"], capsys)
    assert rc == 0, err
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["___.._.._escaped"]
    assert {p.name for p in tmp_path.iterdir()} == {"s.yaml", "results"}


# ---------------------------------------------------------------- output paths: checked first, one line, no output

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Input files every command below reads."""
    d = tmp_path_factory.mktemp("inputs")
    np.save(d / "ids.npy", np.argsort(np.random.default_rng(1).random((32, 2, 8)), axis=2)[:, :, :2])
    return {"scenario": write_scenario(d / "small.yaml", SMALL), "rb": write_scenario(d / "rb.yaml", REBALANCED),
            "trace": small_trace(d / "t.npz"), "npy": d / "ids.npy"}


# command -> (argv with OUT for the output path, module and attribute of the work that must not start)
FOLDER_COMMANDS = {
    "run": (["run", "{scenario}", "-o", "OUT", "-q", "--no-plots"], ("moesim.study", "run_study")),
    "sweep": (["sweep", "{rb}", "--redundant", "0,2", "--every", "1", "-o", "OUT", "-q", "--no-plots"],
              ("moesim.cli.sweep", "run_sweep")),
    "trace stats --plots": (["trace", "stats", "{trace}", "--plots", "OUT"], ("moesim.traces.stats", "trace_stats")),
}
FILE_COMMANDS = {
    "place": (["place", "{scenario}", "--policy", "contiguous", "-o", "OUT"], ("moesim.study", "prepare")),
    "trace import": (["trace", "import", "{npy}", "--num-experts", "8", "-o", "OUT"],
                     ("moesim.traces.readers", "import_trace")),
    "trace stats --json": (["trace", "stats", "{trace}", "--json", "OUT"], ("moesim.traces.stats", "trace_stats")),
    "trace fit": (["trace", "fit", "{trace}", "-o", "OUT"], ("moesim.traces.generator_fit", "fit_trace")),
    "trace generate": (["trace", "generate", "olmoe-1b-7b-c4", "--gpus", "1", "--tokens-per-gpu", "8", "-o", "OUT"],
                       ("moesim.traces.fitted_generator", "write_fitted_trace")),
    "calibrate": (["calibrate", str(H100_ATTENTION), "-o", "OUT"], ("moesim.calibration", "load_bench")),
}


def argv_for(spec: list[str], inputs: dict[str, Path], out: Path | str) -> list[str]:
    return [str(out) if a == "OUT" else a.format(**{k: str(v) for k, v in inputs.items()}) for a in spec]


def bad_output(case: str, tmp_path: Path, folder_output: bool) -> tuple[Path, tuple[str, ...]]:
    """An unusable output path of the given case, made in ``tmp_path``, and words its error names."""
    if case in ("an existing file", "an existing folder"):  # the wrong kind of entry for this output
        out = tmp_path / "taken"
        if folder_output:
            out.write_text("mine")
        else:
            out.mkdir()
        return out, ("is not a folder",) if folder_output else ("is a folder",)
    if case == "under a regular file":
        (tmp_path / "afile").write_text("mine")
        return tmp_path / "afile" / "sub" / "out", (f"{tmp_path / 'afile'} is a file, not a folder",)
    if case == "unwritable":
        if not Path("/proc/self").exists():
            pytest.skip("needs /proc")
        return UNWRITABLE, ("cannot write into /proc",)
    if case == "holding foreign files":
        out = tmp_path / "theirs"
        if folder_output:
            out.mkdir()
            (out / "notes.txt").write_text("mine")
            return out, ("holds notes.txt", "moesim replaces only folders of its own outputs")
        out.write_text("mine")
        return out, ("exists and is not", "moesim replaces only files it wrote")
    raise AssertionError(case)


FOLDER_CASES = ["an existing file", "under a regular file", "unwritable", "holding foreign files"]
FILE_CASES = ["an existing folder", "under a regular file", "unwritable", "holding foreign files"]


@pytest.mark.parametrize("case", FOLDER_CASES)
@pytest.mark.parametrize("command", FOLDER_COMMANDS)
def test_unusable_output_folder_is_one_line_exit_2_before_the_work(command, case, inputs, tmp_path, capsys,
                                                                    monkeypatch):
    spec, (module, attr) = FOLDER_COMMANDS[command]
    monkeypatch.setattr(importlib.import_module(module), attr, never(attr))
    out, words = bad_output(case, tmp_path, folder_output=True)
    before = snapshot(tmp_path)
    rc, stdout, err = cli(argv_for(spec, inputs, out), capsys)
    assert_one_line_error(rc, err, out, *words)
    assert snapshot(tmp_path) == before and stdout == ""
    assert not UNWRITABLE.exists()


@pytest.mark.parametrize("case", FILE_CASES)
@pytest.mark.parametrize("command", FILE_COMMANDS)
def test_unusable_output_file_is_one_line_exit_2_before_the_work(command, case, inputs, tmp_path, capsys,
                                                                  monkeypatch):
    spec, (module, attr) = FILE_COMMANDS[command]
    monkeypatch.setattr(importlib.import_module(module), attr, never(attr))
    out, words = bad_output(case, tmp_path, folder_output=False)
    before = snapshot(tmp_path)
    rc, stdout, err = cli(argv_for(spec, inputs, out), capsys)
    assert_one_line_error(rc, err, out, *words)
    assert snapshot(tmp_path) == before and stdout == ""


def test_bench_checks_its_folder_and_file_first(tmp_path, capsys):
    pytest.importorskip("torch")
    (tmp_path / "afile").write_text("mine")
    rc, _, err = cli(["bench", "ffn", "--cpu", "-o", tmp_path / "afile"], capsys)
    assert_one_line_error(rc, err, tmp_path / "afile", "is not a folder")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "expert_ffn.json").write_text("mine")
    rc, _, err = cli(["bench", "ffn", "--cpu", "-o", tmp_path / "bench"], capsys)
    assert_one_line_error(rc, err, tmp_path / "bench" / "expert_ffn.json", "moesim replaces only files it wrote")
    assert (tmp_path / "bench" / "expert_ffn.json").read_text() == "mine"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_folder_is_refused(tmp_path, inputs, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, _, err = cli(["place", inputs["scenario"], "--policy", "contiguous", "-o", ro / "p.json"], capsys)
        assert_one_line_error(rc, err, ro / "p.json", "permission denied")
        rc, _, err = cli(["run", inputs["scenario"], "-o", ro / "out", "-q"], capsys)
        assert_one_line_error(rc, err, ro / "out", "permission denied")
    finally:
        ro.chmod(0o755)
    assert not any(ro.iterdir())


def test_stats_json_inside_the_plots_folder_is_refused(inputs, tmp_path, capsys):
    rc, _, err = cli(["trace", "stats", inputs["trace"], "--plots", tmp_path / "p",
                      "--json", tmp_path / "p" / "s.json"], capsys)
    assert_one_line_error(rc, err, tmp_path / "p" / "s.json", "inside the --plots folder")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("command", ["run", "sweep"])
@pytest.mark.parametrize("field", ["given", "default"])
def test_scenario_output_holding_foreign_files_names_the_scenario_and_field(command, field, inputs, tmp_path,
                                                                             capsys, monkeypatch):
    """No -o: the folder comes from the scenario's ``output`` (or its default, results/NAME), so the one-line
    error names the scenario file and that field besides the folder and the file in it."""
    monkeypatch.chdir(tmp_path)
    doc = {**REBALANCED, **({"output": "theirs"} if field == "given" else {})}
    scenario = write_scenario(tmp_path / "s.yaml", doc)
    out = Path("theirs" if field == "given" else "results/rb")
    folder = out / "sweep" if command == "sweep" else out
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    spec, (module, attr) = FOLDER_COMMANDS[command]
    monkeypatch.setattr(importlib.import_module(module), attr, never(attr))
    before = snapshot(tmp_path)
    argv = [a for a in argv_for(spec, {**inputs, "scenario": scenario, "rb": scenario}, "OUT") if a != "OUT"]
    argv.remove("-o")
    rc, stdout, err = cli(argv, capsys)
    shown = f"{folder}" + (" (not set: the default, from the name)" if field == "default" else "")
    assert_one_line_error(rc, err, scenario, f"{scenario}: output: {shown}: holds notes.txt,",
                          "moesim replaces only folders of its own outputs")
    assert snapshot(tmp_path) == before and stdout == ""


# ---------------------------------------------------------------- older outputs: replaced whole, or left alone

def test_rerun_replaces_an_older_run_whole(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(["run", inputs["scenario"], "-o", out, "-q", "--no-plots"], capsys)[0] == 0
    assert (out / "placements" / "c" / "round_robin.json").is_file()
    one = write_scenario(tmp_path / "one.yaml", {**SMALL, "placements": ["contiguous"]})
    rc, _, err = cli(["run", one, "-o", out, "-q", "--no-plots"], capsys)
    assert rc == 0, err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "per_gpu_layer.csv", "placements/c/contiguous.json", "results.json", "timeline.json"]  # nothing stale
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.yaml", "out"]  # no temporary folders left


def test_older_run_with_a_foreign_file_is_left_alone(inputs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert cli(["run", inputs["scenario"], "-o", out, "-q", "--no-plots"], capsys)[0] == 0
    (out / "placements" / "c" / "mine.txt").write_text("mine")
    before = snapshot(tmp_path)
    import moesim.study
    monkeypatch.setattr(moesim.study, "run_study", never("run_study"))
    rc, _, err = cli(["run", inputs["scenario"], "-o", out, "-q"], capsys)
    assert_one_line_error(rc, err, out, "holds placements/c/mine.txt")
    assert snapshot(tmp_path) == before


def test_sweep_folder_inside_a_run_folder_is_kept(inputs, tmp_path, capsys, monkeypatch):
    """moesim sweep's default folder is results/NAME/sweep, inside the run's: a rerun carries it over."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(inputs["rb"], tmp_path / "rb.yaml")
    rc, _, err = cli(["sweep", "rb.yaml", "--redundant", "0,2", "--every", "1", "-q", "--no-plots"], capsys)
    assert rc == 0, err
    sweep = snapshot(tmp_path / "results" / "rb" / "sweep")
    assert set(sweep) == {"sweep.csv", "sweep.json"}
    for _ in range(2):  # the first run finds only sweep/, the second an older run beside it
        rc, _, err = cli(["run", "rb.yaml", "-q", "--no-plots"], capsys)
        assert rc == 0, err
        assert snapshot(tmp_path / "results" / "rb" / "sweep") == sweep
        assert (tmp_path / "results" / "rb" / "results.json").is_file()
    rc, _, err = cli(["sweep", "rb.yaml", "--redundant", "0", "--every", "1", "-q", "--no-plots"], capsys)
    assert rc == 0, err  # a sweep replaces its own older folder
    assert sorted(os.listdir(tmp_path / "results")) == ["rb"]
    assert sorted(os.listdir(tmp_path / "results" / "rb")) == [
        "per_gpu_layer.csv", "placements", "rebalance.csv", "results.json", "sweep", "timeline.json"]


def test_file_outputs_replace_what_moesim_wrote(inputs, tmp_path, capsys):
    out = tmp_path / "p.json"
    for policy in ("contiguous", "round_robin"):
        rc, _, err = cli(["place", inputs["scenario"], "--policy", policy, "-o", out], capsys)
        assert rc == 0, err
    assert json.loads(out.read_text())["policy"] == "round_robin"
    plots = tmp_path / "plots"
    for _ in range(2):
        rc, _, err = cli(["trace", "stats", inputs["trace"], "--plots", plots, "--json", tmp_path / "s.json"], capsys)
        assert rc == 0, err
    assert sorted(os.listdir(plots)) == ["coactivation.png", "drift.png", "load.png", "transitions.png"]
    assert sorted(os.listdir(tmp_path)) == ["p.json", "plots", "s.json"]


# ---------------------------------------------------------------- Ctrl-C and failures mid-write

@pytest.fixture
def older_run(inputs, tmp_path, capsys):
    """An older run's folder (tmp_path/out) and a snapshot of tmp_path with it."""
    out = tmp_path / "out"
    assert cli(["run", inputs["scenario"], "-o", out, "-q", "--no-plots"], capsys)[0] == 0
    return out, snapshot(tmp_path)


def test_ctrl_c_mid_write_leaves_the_older_outputs(inputs, older_run, tmp_path, capsys, monkeypatch):
    from moesim.report import timeline

    out, before = older_run

    def interrupted(result, path):
        path.write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(timeline, "write", interrupted)
    rc, _, err = cli(["run", inputs["scenario"], "-o", out, "-q", "--no-plots"], capsys)
    assert rc == 130 and err == "moesim: interrupted\n"
    assert snapshot(tmp_path) == before  # older outputs byte for byte, no temporary folder


def test_ctrl_c_during_the_swap_is_held_until_it_is_done(inputs, older_run, tmp_path, capsys, monkeypatch):
    out, _ = older_run
    rename = os.rename
    calls = []

    def rename_then_ctrl_c(src, dst):
        calls.append(dst)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)  # delivered now; held back until the swap is complete
        rename(src, dst)

    monkeypatch.setattr(fileio.os, "rename", rename_then_ctrl_c)
    one = write_scenario(tmp_path / "one.yaml", {**SMALL, "placements": ["contiguous"]})
    rc, _, err = cli(["run", one, "-o", out, "-q", "--no-plots"], capsys)
    monkeypatch.undo()
    assert rc == 130 and err == "moesim: interrupted\n"
    assert len(calls) == 2  # old aside, new in
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "per_gpu_layer.csv", "placements/c/contiguous.json", "results.json", "timeline.json"]  # the new, whole
    assert sorted(os.listdir(tmp_path)) == ["one.yaml", "out"]


def test_a_failed_swap_puts_the_older_outputs_back(inputs, older_run, tmp_path, capsys, monkeypatch):
    out, before = older_run
    rename = os.rename

    def second_rename_fails(src, dst):
        if Path(dst) == out and Path(src).name == "new":  # the new outputs into place
            raise OSError(28, "No space left on device", str(dst))
        rename(src, dst)

    monkeypatch.setattr(fileio.os, "rename", second_rename_fails)
    rc, _, err = cli(["run", inputs["scenario"], "-o", out, "-q", "--no-plots"], capsys)
    monkeypatch.undo()
    assert_one_line_error(rc, err, out, "No space left on device")
    assert snapshot(tmp_path) == before


def test_an_empty_folder_is_filled_in_place(inputs, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    inode = out.stat().st_ino
    assert cli(["run", inputs["scenario"], "-o", out, "-q", "--no-plots"], capsys)[0] == 0
    assert out.stat().st_ino == inode and (out / "results.json").is_file()  # the same folder, now filled
    assert sorted(os.listdir(tmp_path)) == ["mine"]


def test_the_working_folder_is_replaced_in_place(inputs, older_run, tmp_path, capsys, monkeypatch):
    """-o . from inside an older run's folder: the outputs are replaced, the working directory stays valid;
    interrupted or failing half way, the older outputs are all back."""
    out, before = older_run
    monkeypatch.chdir(out)
    from moesim.report import timeline

    def interrupted(result, path):
        path.write_text("half")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(timeline, "write", interrupted)
        rc, _, err = cli(["run", inputs["scenario"], "-o", ".", "-q", "--no-plots"], capsys)
    assert rc == 130 and err == "moesim: interrupted\n"
    assert snapshot(tmp_path) == before
    rename = os.rename

    def sixth_rename_fails(src, dst, calls=[]):
        calls.append(src)
        if len(calls) == 6:  # the 4 older entries went aside, one new one went in, the next one fails
            raise OSError(28, "No space left on device", str(dst))
        rename(src, dst)

    with monkeypatch.context() as m:
        m.setattr(fileio.os, "rename", sixth_rename_fails)
        rc, _, err = cli(["run", inputs["scenario"], "-o", ".", "-q", "--no-plots"], capsys)
    assert_one_line_error(rc, err, ".", "No space left on device")
    assert snapshot(tmp_path) == before
    one = write_scenario(tmp_path / "one.yaml", {**SMALL, "placements": ["contiguous"]})
    assert cli(["run", one, "-o", ".", "-q", "--no-plots"], capsys)[0] == 0
    assert Path.cwd() == out and sorted(os.listdir(".")) == [
        "per_gpu_layer.csv", "placements", "results.json", "timeline.json"]
    assert os.listdir("placements/c") == ["contiguous.json"]


def test_ctrl_c_mid_file_write_leaves_the_older_file(inputs, tmp_path, capsys, monkeypatch):
    from moesim.traces import format as trace_format

    out = tmp_path / "t.npz"
    assert cli(["trace", "import", inputs["npy"], "--num-experts", "8", "-o", out], capsys)[0] == 0
    before = snapshot(tmp_path)

    def interrupted(fh, arrays, compress):
        fh.write(b"PK half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(trace_format, "_write_npz", interrupted)
    rc, _, err = cli(["trace", "import", inputs["npy"], "--num-experts", "8", "-o", out], capsys)
    assert rc == 130 and err == "moesim: interrupted\n"
    assert snapshot(tmp_path) == before
    deep = tmp_path / "new" / "deep" / "t.npz"
    rc, _, err = cli(["trace", "import", inputs["npy"], "--num-experts", "8", "-o", deep], capsys)
    assert rc == 130 and snapshot(tmp_path) == before  # the folders made for it are gone again


def test_ctrl_c_mid_sweep_write_leaves_the_older_sweep(inputs, tmp_path, capsys, monkeypatch):
    from moesim.report import rebalance

    out = tmp_path / "sweep"
    argv = ["sweep", inputs["rb"], "--redundant", "0", "--every", "1", "-o", out, "-q", "--no-plots"]
    assert cli(argv, capsys)[0] == 0
    before = snapshot(tmp_path)

    def interrupted(rows, path):
        path.write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(rebalance, "write_sweep_csv", interrupted)
    rc, _, err = cli(argv, capsys)
    assert rc == 130 and err == "moesim: interrupted\n"
    assert snapshot(tmp_path) == before


def test_real_ctrl_c_exits_130_with_one_line(inputs, tmp_path):
    """A SIGINT while simulating: no traceback, ``moesim: interrupted``, exit status 130, nothing written."""
    code = textwrap.dedent(f"""
        import os, signal, sys
        import moesim.study
        from moesim.cli import main
        def simulate(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)
            raise AssertionError("SIGINT did not interrupt")
        moesim.study.run_study = simulate
        sys.exit(main(["run", {str(inputs['scenario'])!r}, "-o", {str(tmp_path / 'out')!r}, "-q"]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "moesim: interrupted\n"
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- a run killed outright: its temporary folders go

def killed_mid_write(argv: list[str], cwd: Path, kill_in: tuple[str, str] = ("moesim.report.timeline", "write")
                     ) -> subprocess.CompletedProcess[str]:
    """``moesim ARGV`` in a fresh process that SIGKILLs itself while writing its outputs (in ``kill_in``):
    no handler, no cleanup."""
    module, attr = kill_in
    code = textwrap.dedent(f"""
        import importlib, os, signal, sys
        from moesim.cli import main
        def killed(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        setattr(importlib.import_module({module!r}), {attr!r}, killed)
        sys.exit(main({[str(a) for a in argv]!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return proc


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_killed_run_leaves_a_temporary_folder_that_the_next_run_removes(inputs, older_run, tmp_path, capsys):
    out, before = older_run
    killed_mid_write(["run", inputs["scenario"], "-o", out, "-q", "--no-plots"], tmp_path)
    (left,) = hidden(tmp_path)  # what SIGKILL leaves: one marked temporary folder beside the older outputs
    assert re.fullmatch(r"\.out\.moesim-[0-9]+-\w+\.tmp", left), left
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith(".")} == before
    rc, _, err = cli(["run", inputs["scenario"], "-o", out, "-q", "--no-plots"], capsys)
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path)) == ["out"] and (out / "results.json").is_file()


def test_a_killed_run_into_an_empty_folder_does_not_block_the_next(inputs, tmp_path, capsys):
    """Filling an empty folder in place puts the temporary folder inside it: left behind, it would make the
    folder look foreign to the next run."""
    out = tmp_path / "mine"
    out.mkdir()
    killed_mid_write(["run", inputs["scenario"], "-o", out, "-q", "--no-plots"], tmp_path)
    (left,) = hidden(out)
    assert re.fullmatch(r"\.moesim-[0-9]+-\w+\.tmp", left), left
    rc, _, err = cli(["run", inputs["scenario"], "-o", out, "-q", "--no-plots"], capsys)
    assert rc == 0, err
    assert hidden(out) == [] and os.listdir(tmp_path) == ["mine"] and (out / "results.json").is_file()


def test_a_killed_file_write_leaves_a_folder_that_the_next_write_removes(inputs, tmp_path, capsys):
    out = tmp_path / "t.npz"
    argv = ["trace", "import", inputs["npy"], "--num-experts", "8", "-o", out]
    killed_mid_write(argv, tmp_path, ("moesim.traces.format", "_write_npz"))
    (left,) = hidden(tmp_path)
    assert re.fullmatch(r"\.t\.npz\.moesim-[0-9]+-\w+\.tmp", left), left
    rc, _, err = cli(argv, capsys)
    assert rc == 0, err
    assert os.listdir(tmp_path) == ["t.npz"]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def fake_temporary(parent: Path, pid: int, *, target: str = "out", host: str | None = None,
                   name: str | None = None, marker: bool = True, old: bool = False) -> Path:
    """A folder as :func:`moesim.fileio.temporary_folder` makes them, of process ``pid`` (and ``host``)."""
    stem = "" if target == "." else f".{target}"
    path = parent / (name or f"{stem}.moesim-{pid}-abc_1234.tmp")
    (path / "new").mkdir(parents=True)
    (path / "new" / "results.json").write_text("{}")
    if old:
        (path / "old").mkdir()
    if marker:
        (path / fileio.TEMP_MARKER).write_text(json.dumps({"format": "moesim.temporary/1", "pid": pid, "target": target,
                                                           "host": host or scratch._process_space()}))
    return path


def test_only_stale_temporaries_of_moesim_are_removed(tmp_path):
    gone = dead_pid()
    stale = [fake_temporary(tmp_path, gone), fake_temporary(tmp_path, gone, target="other.yaml"),
             fake_temporary(tmp_path, gone, target=".")]
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live:
        try:
            running = fake_temporary(tmp_path, live.pid)  # a live process's
            only_copy = fake_temporary(tmp_path, gone, target="missing", old=True)  # the older outputs, set aside
            kept = [
                running, only_copy,
                fake_temporary(tmp_path, os.getpid(), target="mine"),  # this process's
                fake_temporary(tmp_path, gone, target="x", host="another-host"),  # its pid means nothing here
                fake_temporary(tmp_path, gone, target="x2", host=f"{socket.gethostname()} pid:[1]"),  # a container
                fake_temporary(tmp_path, gone, target="y", marker=False),  # the name alone proves nothing
                fake_temporary(tmp_path, gone, name=f".z.moesim-{live.pid}-xyz_9876.tmp"),  # name, marker differ
                fake_temporary(tmp_path, gone, name=f".backup-{gone}"),  # not our name, whatever it holds
                fake_temporary(tmp_path, gone, target="../up", name=f".up.moesim-{gone}-def_5678.tmp"),  # elsewhere
            ]
            link = tmp_path / f".link.moesim-{gone}-abc_1234.tmp"
            link.symlink_to(stale[0], target_is_directory=True)  # a link is never followed
            assert fileio.remove_stale_temporaries(tmp_path) == sorted(stale)
        finally:
            live.kill()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in [*kept, link])
    assert all((p / "new" / "results.json").is_file() for p in kept)
    (tmp_path / "missing").mkdir()  # the older outputs' folder exists again: the set-aside copy is stale
    assert fileio.remove_stale_temporaries(tmp_path) == sorted([running, only_copy])  # and that process is gone


def test_checking_an_output_path_removes_stale_temporaries_beside_and_inside(tmp_path):
    gone = dead_pid()
    beside = fake_temporary(tmp_path, gone)
    out = tmp_path / "out"
    out.mkdir()
    inside = fake_temporary(out, gone, target=".")
    assert fileio.check_output_folder(out, fileio.FolderKind("outputs")) == out  # not foreign: gone first
    assert not beside.exists() and not inside.exists() and os.listdir(out) == []
    beside = fake_temporary(tmp_path, gone, target="p.json")
    fileio.check_output_file(tmp_path / "p.json", owned=lambda p: True, what="a file")
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ---------------------------------------------------------------- Matplotlib's backend is the caller's

def inline_backend() -> str:
    pytest.importorskip("matplotlib_inline")
    return "module://matplotlib_inline.backend_inline"


@pytest.mark.parametrize("backend", ["template", pytest.param("inline", id="jupyter-inline")])
def test_importing_and_plotting_leave_the_backend_alone(backend, inputs, tmp_path):
    backend = inline_backend() if backend == "inline" else backend
    code = textwrap.dedent(f"""
        import sys
        import matplotlib
        before = matplotlib.get_backend()
        import moesim
        assert matplotlib.get_backend() == before, ("import", matplotlib.get_backend())
        from moesim.traces.format import load_trace
        from moesim.traces.stats import plot_stats, trace_stats
        result = moesim.run_study(moesim.load_scenario({str(inputs['scenario'])!r}), progress=False)
        moesim.write_outputs(result, {str(tmp_path / 'out')!r})
        plot_stats(trace_stats(load_trace({str(inputs['trace'])!r})), {str(tmp_path / 'plots')!r})
        assert matplotlib.get_backend() == before, ("plots", matplotlib.get_backend())
        assert "matplotlib.pyplot" not in sys.modules
        print(before)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": backend})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == backend
    assert (tmp_path / "out" / "speedup.png").stat().st_size > 0 and (tmp_path / "plots" / "load.png").is_file()


# ---------------------------------------------------------------- the README's commands write under out/

def test_readme_commands_write_under_the_ignored_out_folder():
    readme = (REPO / "README.md").read_text()
    outputs = re.findall(r"moesim [^`\n]*?(?:-o|--output|--plots|--json) (\S+)", readme)
    assert outputs and all(o.startswith("out/") for o in outputs), outputs
    assert "/out/" in (REPO / ".gitignore").read_text().split()
