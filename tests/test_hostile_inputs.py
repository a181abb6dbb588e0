"""Malformed and hostile inputs, for every command and kind of input: each fails fast, as one line.

A corpus generated at run time (no binary fixtures are committed): scenario YAML, cluster YAML, placement
JSON, fitted-generator parameters, traces (.npz, .npy, .csv, .jsonl, .gz), calibration JSON and
command-line flags. Each case writes its files into a folder of its own and names the command to run on
them. All cases run in one subprocess (``_runner``: in-process calls of ``moesim.cli.main``, its address
space capped by RLIMIT_AS at 2 GB above what the imports take), which reports per case the exit status,
stdout, stderr, seconds, peak memory so far and the files left in the folder. Each case is one test that
asserts: exit status 2; exactly one line on stderr, ``moesim: error: `` naming the file (and the field or
line where there is one); no traceback; nothing written; under 10 s; the process under 2 GB more than its
imports.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import yaml

SECONDS = 10.0
EXTRA_BYTES = 2 << 30  # per case, over the runner's baseline after imports

# ------------------------------------------------------------------------------------------------ corpus

Build = Callable[[Path], list[str]]  # writes a case's files into its folder, returns the CLI arguments


@dataclass
class Case:
    id: str
    kind: str
    build: Build
    names: tuple[str, ...]  # what the error line must name: the file, and the field or line where there is one
    env: dict[str, str] = field(default_factory=dict)


CASES: list[Case] = []


def case(kind: str, id: str, *names: str, **env: str) -> Callable[[Build], Build]:
    def deco(fn: Build) -> Build:
        CASES.append(Case(f"{kind}/{id}", kind, fn, names, env))
        return fn

    return deco


def write(path: Path, data: Any) -> Path:
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif isinstance(data, str):
        path.write_text(data)
    else:
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def scenario(**changes: Any) -> dict[str, Any]:
    """A small valid scenario (8 GPUs, 4 layers of 16 experts, top-2), with top-level sections replaced and
    ``section__key=value`` changes applied."""
    data: dict[str, Any] = {
        "name": "hostile",
        "clusters": [{"name": "c8", "preset": "hgx-h200"}],
        "model": {"num_layers": 4, "num_experts": 16, "top_k": 2, "d_model": 256, "d_ff": 512},
        "workload": {"synthetic": {"tokens_per_gpu": 32, "batches": 2, "seed": 1}},
        "placements": ["contiguous"],
        "engine": {"progress": False},
    }
    for key, value in changes.items():
        node = data
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        node[leaf] = value
    return data


def validate(name: str = "s.yaml") -> list[str]:
    return ["validate", name]


def run(name: str = "s.yaml") -> list[str]:
    return ["run", name, "-o", "out", "-q", "--no-plots"]


def scenario_text(**changes: Any) -> str:
    return yaml.safe_dump(scenario(**changes), sort_keys=False)


# ---- trace files

META = {"format": "moesim.trace/1", "num_experts": 16, "num_layers": 4, "top_k": 2, "model": "t", "source": "t"}


def experts(tokens: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([np.stack([rng.choice(16, 2, replace=False) for _ in range(4)]) for _ in range(tokens)]
                    ).astype(np.int16)


def npz(path: Path, *, compress: bool = True, meta: Any = None, **arrays: Any) -> Path:
    members = {"experts": experts(), **arrays}
    members = {k: v for k, v in members.items() if v is not None}
    members["meta"] = np.array(json.dumps(META if meta is None else meta) if not isinstance(meta, str) else meta)
    (np.savez_compressed if compress else np.savez)(path, **members)
    return path


def npy_bytes(shape: tuple[int, ...], descr: str = "<i2", data: bytes = b"", version: int = 1) -> bytes:
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode("latin1")
    pad = 64 - (10 + len(header) + 1) % 64
    header += b" " * pad + b"\n"
    size = struct.pack("<H", len(header)) if version == 1 else struct.pack("<I", len(header))
    return b"\x93NUMPY" + bytes([version, 0]) + size + header + data


def zip_of(path: Path, members: dict[str, bytes], compress: bool = False) -> Path:
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=mode) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def meta_npy(meta: Any = None) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array(json.dumps(META if meta is None else meta)))
    return buf.getvalue()


def corrupt_member(path: Path, name: str, at: float = 0.5) -> Path:
    """Flip bytes in the middle of member ``name``'s stored data (its deflate stream, when compressed)."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    pos = start + int(info.compress_size * at)
    for i in range(pos, min(pos + 16, start + info.compress_size)):
        raw[i] ^= 0xA5
    path.write_bytes(bytes(raw))
    return path


def trace_scenario(d: Path, trace: str = "t.npz", **changes: Any) -> list[str]:
    write(d / "s.yaml", scenario(workload={"trace": {"file": trace, "tokens_per_gpu": 8}}, **changes))
    return validate()


# ---- routing logs

def csv_log(rows: list[tuple[int, int, list[int]]], header: bool = True) -> str:
    lines = ["layer,request,token,experts"] if header else []
    lines += [f'{lay},{req},tok,"{ids}"' for lay, req, ids in rows]
    return "\n".join(lines) + "\n"


GOOD_ROWS = [(lay, 0, [lay % 4, (lay + 1) % 4]) for lay in range(2) for _ in range(3)]


def jsonl_log(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


GOOD_JSONL = [{"layer": lay, "token": t, "experts": [t % 4, (t + 1) % 4]} for t in range(3) for lay in range(2)]


def import_cmd(name: str, *flags: str) -> list[str]:
    return ["trace", "import", name, "-o", "out/t.npz", *flags]


# ---- calibration files

def a2a_bench(**changes: Any) -> dict[str, Any]:
    uniform = [{"bytes_per_pair": 1024 * 4**i, "ms_median_max_over_ranks": 0.04 + 0.01 * i} for i in range(6)]
    skew = [{"bytes_matrix": [[1024, 2048], [4096, 8192]], "ms_median_per_rank": [0.05, 0.06]}]
    data: dict[str, Any] = {"world": 2, "device": "NVIDIA H200", "uniform": uniform, "skew": skew,
                            "p2p": [{"bytes": 1 << 20, "ms": 0.05}]}
    data.update(changes)
    return data


def ffn_bench(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"device": "NVIDIA H200",
                            "single": {"m": {"d_model": 4096, "d_ff": 14336,
                                             "rows": [[2**i, 0.1 + 0.01 * i] for i in range(8)]}},
                            "multi": [{"shape": "m", "loads": [16, 1024, 0, 16], "ms": 1.3}]}
    data.update(changes)
    return data


def moe_record(**changes: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"shape": "s", "d_model": 256, "d_ff": 512, "num_experts": 8, "top_k": 2, "ep": 1,
                         "local_experts": 8, "pipeline": "torch_reference", "dtype": "bf16", "routing": "uniform",
                         "tokens": 32, "rows": 64, "rows_per_expert": [8] * 8, "send_rows": 64,
                         "steps_ms": {"router": 0.1, "gemm_gate_up": 0.2, "gemm_down": 0.1}, "steps_sum_ms": 0.4,
                         "total_ms": 0.4}
    r.update(changes)
    return r


def calibrate_cmd(*names: str) -> list[str]:
    return ["calibrate", *names, "-o", "out/c.yaml"]


# ================================================================================================ scenario YAML

@case("scenario", "not-utf8", "s.yaml", "byte 0xff")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", b"name: \xff\xfe bad\n" + scenario_text().encode())
    return validate()


@case("scenario", "utf16", "s.yaml")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario_text().encode("utf-16"))
    return validate()


@case("scenario", "lone-surrogate-escape", "s.yaml")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario_text().replace("name: hostile", 'name: "a\\ud800b"'))
    return validate()


@case("scenario", "duplicate-top-key", "s.yaml", "line")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario_text() + "clusters: [hgx-h200]\n")
    return validate()


@case("scenario", "duplicate-nested-key", "s.yaml", "model.num_layers", "line")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario_text().replace("  num_layers: 4\n", "  num_layers: 4\n  num_layers: 400\n"))
    return validate()


@case("scenario", "billion-laughs", "s.yaml", "alias")
def _(d: Path) -> list[str]:
    lol = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lol += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    write(d / "s.yaml", "\n".join(lol) + "\n" + scenario_text())
    return validate()


@case("scenario", "alias-bomb-in-field", "s.yaml")
def _(d: Path) -> list[str]:
    refs = [", ".join([f"*x{i - 1}" if i > 1 else "*x"] * 10) for i in range(1, 8)]
    text = "x: &x [1,1,1,1,1,1,1,1,1,1]\n" + "".join(f"x{i}: &x{i} [{r}]\n" for i, r in enumerate(refs, start=1))
    write(d / "s.yaml", scenario_text().replace("name: hostile", "name: *x7").replace("name:", text + "name:", 1))
    return validate()


@case("scenario", "alias-references-5000", "s.yaml", "alias")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario_text() + "output: &o x\nrebalance: [" + ", ".join(["*o"] * 5000) + "]\n")
    return validate()


@case("scenario", "recursive-alias", "s.yaml")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario_text() + "output: &o [1, *o]\n")
    return validate()


@case("scenario", "deep-flow-nesting", "s.yaml")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario_text() + "output: " + "[" * 5000 + "]" * 5000 + "\n")
    return validate()


@case("scenario", "deep-block-nesting", "s.yaml")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario_text() + "output:\n" + "".join("  " * (i + 1) + "- \n" for i in range(300)))
    return validate()


@case("scenario", "deep-mapping-nesting", "s.yaml")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario_text().replace("progress: false", "progress: " + "{a: " * 200 + "1" + "}" * 200))
    return validate()


@case("scenario", "int-5000-digits", "s.yaml")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario_text().replace("num_layers: 4", "num_layers: " + "9" * 5000))
    return validate()


@case("scenario", "int-beyond-64-bits", "s.yaml", "model.num_experts")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario_text().replace("num_experts: 16", f"num_experts: {2**70}"))
    return validate()


@case("scenario", "tokens-10e12", "s.yaml", "workload")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(workload__synthetic__tokens_per_gpu=10**9, workload__synthetic__batches=1000))
    return validate()


@case("scenario", "tokens-beyond-int32", "s.yaml", "workload.synthetic.tokens_per_gpu")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(workload__synthetic__tokens_per_gpu=10**12))
    return validate()


@case("scenario", "batches-1e9", "s.yaml", "workload")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(workload__synthetic__batches=10**9))
    return validate()


@case("scenario", "batches-1e9-run", "s.yaml", "workload")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(workload__synthetic__batches=10**9))
    return run()


@case("scenario", "profile-batches-1e9", "s.yaml", "workload")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(workload__synthetic__profile_batches=10**9))
    return validate()


@case("scenario", "nodes-1e5", "s.yaml", "clusters[0].nodes")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(clusters=[{"preset": "hgx-h200", "nodes": 100_000}]))
    return validate()


@case("scenario", "nodes-1e12", "s.yaml", "clusters[0].nodes")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(clusters=[{"preset": "hgx-h200", "nodes": 10**12}]))
    return validate()


@case("scenario", "gpus-per-node-1e4", "s.yaml", "clusters[0].nodes")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(clusters=[{"preset": "hgx-h200", "gpus_per_node": 20_000}]))
    return validate()


@case("scenario", "experts-1e5-pairwise", "s.yaml", "needs about")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(model={"num_layers": 4, "num_experts": 100_000, "top_k": 2, "d_model": 8,
                                        "d_ff": 8}, placements=["affinity"]))
    return validate()


@case("scenario", "experts-1e7", "s.yaml", "model.num_experts")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(model__num_experts=10**7))
    return validate()


@case("scenario", "layers-1e5", "s.yaml")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(model__num_layers=100_000, model__d_model=8, model__d_ff=8,
                                 workload__synthetic__batches=100))
    return validate()


@case("scenario", "layers-1e9", "s.yaml", "model.num_layers")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(model__num_layers=10**9))
    return validate()


@case("scenario", "drift-1e12", "s.yaml", "workload.synthetic.drift_swaps_per_batch")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(workload__synthetic__drift_swaps_per_batch=1e12))
    return validate()


@case("scenario", "drift-beyond-e2", "s.yaml", "workload.synthetic.drift_swaps_per_batch")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(workload__synthetic__drift_swaps_per_batch=100000.0))
    return run()


@case("scenario", "seed-negative", "s.yaml", "workload.synthetic.seed")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(workload__synthetic__seed=-1))
    return run()


@case("scenario", "seed-beyond-64-bits", "s.yaml", "workload.synthetic.seed")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario_text().replace("seed: 1", f"seed: {2**64}"))
    return validate()


@case("scenario", "zipf-nan", "s.yaml", "workload.synthetic.zipf_alpha")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario_text().replace("seed: 1", "seed: 1\n    zipf_alpha: .nan"))
    return validate()


@case("scenario", "zipf-inf", "s.yaml", "workload.synthetic.zipf_alpha")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario_text().replace("seed: 1", "seed: 1\n    zipf_alpha: .inf"))
    return run()


@case("scenario", "zipf-1e300", "s.yaml", "workload.synthetic.zipf_alpha")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(workload__synthetic__zipf_alpha=1e300))
    return run()


@case("scenario", "gpu-mix-huge", "s.yaml", "workload.synthetic.gpu_mix_sigma")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(workload__synthetic__gpu_mix_sigma=1e5))
    return run()


@case("scenario", "affinity-nan", "s.yaml", "workload.synthetic.affinity")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario_text().replace("seed: 1", "seed: 1\n    affinity: .NaN"))
    return validate()


@case("scenario", "tokens-string", "s.yaml", "workload.synthetic.tokens_per_gpu")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(workload__synthetic__tokens_per_gpu="lots"))
    return validate()


@case("scenario", "rate-tolerance-nan", "s.yaml", "engine.rate_tolerance")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario_text().replace("progress: false", "progress: false\n  rate_tolerance: .nan"))
    return validate()


@case("scenario", "kv-len-1e12", "s.yaml", "workload.kv_len")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(workload__kv_len=10**12, model__num_heads=4))
    return validate()


@case("scenario", "dtype-bytes-tiny", "s.yaml", "model.dtype_bytes")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(model__dtype_bytes=1e-300))
    return run()


@case("scenario", "dispatch-bytes-inf", "s.yaml", "model.dispatch_bytes_per_token")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario_text().replace("d_ff: 512", "d_ff: 512\n  dispatch_bytes_per_token: .inf"))
    return run()


@case("scenario", "bool-as-number", "s.yaml", "clusters[0].nodes")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(clusters=[{"preset": "hgx-h200", "nodes": True}]))
    return validate()


@case("scenario", "yaml-binary-tag", "s.yaml", "name")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario_text().replace("name: hostile", "name: !!binary aG9zdGlsZQ=="))
    return validate()


@case("scenario", "yaml-python-tag", "s.yaml")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario_text().replace("name: hostile", "name: !!python/object/apply:os.getcwd []"))
    return validate()


@case("scenario", "two-documents", "s.yaml")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario_text() + "---\nname: second\n")
    return validate()


@case("scenario", "top-level-list", "s.yaml")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", "- clusters\n- model\n")
    return validate()


@case("scenario", "empty-file", "s.yaml")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", "")
    return validate()


@case("scenario", "a-folder", "s.yaml")
def _(d: Path) -> list[str]:
    (d / "s.yaml").mkdir()
    return validate()


@case("scenario", "missing-file", "nope.yaml")
def _(d: Path) -> list[str]:
    return validate("nope.yaml")


@case("scenario", "model-non-string-keys", "s.yaml", "model[1]")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario_text().replace("  num_layers: 4\n", "  num_layers: 4\n  1: 2\n"))
    return validate()


@case("scenario", "rebalance-every-1e12", "s.yaml", "rebalance.every_batches")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(placements=["contiguous", "greedy"],
                                 rebalance={"policy": "greedy", "every_batches": 10**12, "window_batches": 1}))
    return validate()


@case("scenario", "random-seed-negative", "s.yaml", "placements[1].seed")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(placements=["contiguous", {"policy": "random", "seed": -1}]))
    return run()


@case("scenario", "policy-option-nan", "s.yaml", "placements[1]")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario_text().replace("- contiguous", "- contiguous\n- {policy: ilp, time_limit_s: .nan}"))
    return validate()


@case("scenario", "top-k-over-experts", "s.yaml", "model")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(model__top_k=17))
    return validate()


@case("scenario", "placements-not-list", "s.yaml", "placements")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(placements={"a": 1}))
    return validate()


@case("scenario", "model-preset-unknown", "s.yaml", "model.preset", "unknown model preset")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(model={"preset": "deepseek-v99", "num_layers": 2}))
    return run()


@case("scenario", "model-preset-not-text", "s.yaml", "model.preset")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(model={"preset": {"name": "deepseek-v3"}}))
    return run()


@case("scenario", "model-preset-override-out-of-range", "s.yaml", "model.num_layers")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(model={"preset": "qwen3-30b-a3b", "num_layers": -3}))
    return run()


@case("scenario", "model-preset-override-unknown-key", "s.yaml", "model.moe_layers")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(model={"preset": "llama-4-maverick", "moe_layers": [1, 3]}))
    return run()


@case("scenario", "model-preset-override-breaks-groups", "s.yaml", "model", "expert_groups")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(model={"preset": "deepseek-v3", "num_layers": 2, "num_experts": 20}))
    return run()


# ================================================================================================ cluster YAML

def with_cluster_file(d: Path, content: Any, cmd: str = "validate") -> list[str]:
    write(d / "c.yaml", content)
    write(d / "s.yaml", scenario(clusters=[{"file": "c.yaml"}]))
    return validate() if cmd == "validate" else ["cluster", "show", "c.yaml"]


CLUSTER = {"preset": "hgx-h200", "nodes": 2}


@case("cluster", "not-utf8", "c.yaml", "s.yaml", "byte 0x")
def _(d: Path) -> list[str]:
    return with_cluster_file(d, b"preset: hgx-h200\nname: \xc3\x28\n")


@case("cluster", "duplicate-key", "c.yaml", "s.yaml", "nodes")
def _(d: Path) -> list[str]:
    return with_cluster_file(d, "preset: hgx-h200\nnodes: 1\nnodes: 2\n")


@case("cluster", "duplicate-nested-key-show", "c.yaml", "nvlink.GBps")
def _(d: Path) -> list[str]:
    return with_cluster_file(d, "preset: hgx-h200\nnvlink:\n  GBps: 400\n  GBps: 900\n", "show")


@case("cluster", "alias-bomb-show", "c.yaml")
def _(d: Path) -> list[str]:
    lol = ["a0: &a0 [1,1,1,1,1,1,1,1,1,1]"] + [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]"
                                               for i in range(1, 8)]
    return with_cluster_file(d, "\n".join(lol) + "\npreset: hgx-h200\n", "show")


@case("cluster", "top-level-list-show", "c.yaml")
def _(d: Path) -> list[str]:
    return with_cluster_file(d, "- 1\n- 2\n", "show")


@case("cluster", "nvlink-inf", "c.yaml", "s.yaml", "nvlink.GBps")
def _(d: Path) -> list[str]:
    return with_cluster_file(d, "preset: hgx-h200\nnvlink: {GBps: .inf}\n")


@case("cluster", "nvlink-1e300", "s.yaml", "nvlink.GBps")
def _(d: Path) -> list[str]:
    return with_cluster_file(d, {"preset": "hgx-h200", "nvlink": {"GBps": 1e300}})


@case("cluster", "nic-gbps-1e300", "s.yaml", "network.nic_Gbps")
def _(d: Path) -> list[str]:
    return with_cluster_file(d, {"preset": "hgx-h200", "nodes": 2, "network": {"nic_Gbps": 1e300}})


@case("cluster", "latency-negative", "s.yaml", "nvlink.latency_us")
def _(d: Path) -> list[str]:
    return with_cluster_file(d, {"preset": "hgx-h200", "nvlink": {"latency_us": -1}})


@case("cluster", "latency-1e30", "s.yaml", "network.latency_us")
def _(d: Path) -> list[str]:
    return with_cluster_file(d, {"preset": "hgx-h200", "nodes": 2, "network": {"latency_us": 1e30}})


@case("cluster", "efficiency-zero", "s.yaml", "nvlink.efficiency")
def _(d: Path) -> list[str]:
    return with_cluster_file(d, {"preset": "hgx-h200", "nvlink": {"efficiency": 0}})


@case("cluster", "efficiency-1e-300", "s.yaml", "gpu.compute_efficiency")
def _(d: Path) -> list[str]:
    return with_cluster_file(d, {"preset": "hgx-h200", "gpu": {"compute_efficiency": 1e-300}})


@case("cluster", "tflops-nan", "c.yaml", "s.yaml", "gpu.bf16_tflops")
def _(d: Path) -> list[str]:
    return with_cluster_file(d, "preset: hgx-h200\ngpu: {bf16_tflops: .nan}\n")


@case("cluster", "hbm-1e12", "s.yaml", "gpu.hbm_GBps")
def _(d: Path) -> list[str]:
    return with_cluster_file(d, {"preset": "hgx-h200", "gpu": {"hbm_GBps": 1e12}})


@case("cluster", "a2a-launch-1e12", "s.yaml", "a2a_launch_us")
def _(d: Path) -> list[str]:
    return with_cluster_file(d, {"preset": "hgx-h200", "a2a_launch_us": 1e12})


@case("cluster", "gpus-per-node-zero", "s.yaml", "gpus_per_node")
def _(d: Path) -> list[str]:
    return with_cluster_file(d, {"preset": "hgx-h200", "gpus_per_node": 0})


@case("cluster", "oversubscription-inf", "c.yaml", "s.yaml", "network.oversubscription")
def _(d: Path) -> list[str]:
    return with_cluster_file(d, "preset: hgx-h200\nnodes: 2\nnetwork: {oversubscription: .inf}\n")


@case("cluster", "pipeline-tile-huge", "s.yaml", "tile_m")
def _(d: Path) -> list[str]:
    return with_cluster_file(d, {"preset": "hgx-h200", "gpu": {"moe_pipelines": {"fused": {"tile_m": 10**9}}}})


@case("cluster", "show-nodes-1e5", "c.yaml", "nodes")
def _(d: Path) -> list[str]:
    return with_cluster_file(d, {"preset": "hgx-h200", "nodes": 100_000}, "show")


@case("cluster", "show-preset-unknown", "nope")
def _(d: Path) -> list[str]:
    return ["cluster", "show", "nope"]


# ================================================================================================ CLI flags

@case("flags", "set-into-number", "hgx-h200", "--set nodes.b")
def _(d: Path) -> list[str]:
    return ["cluster", "show", "hgx-h200", "--set", "nodes.b=1"]


@case("flags", "set-into-string", "hgx-h200", "--set gpu.name.x")
def _(d: Path) -> list[str]:
    return ["cluster", "show", "hgx-h200", "--set", "gpu.name.x=1"]


@case("flags", "set-bad-yaml", "hgx-h200", "--set nodes")
def _(d: Path) -> list[str]:
    return ["cluster", "show", "hgx-h200", "--set", "nodes=["]


@case("flags", "set-nan", "hgx-h200", "--set nvlink.GBps")
def _(d: Path) -> list[str]:
    return ["cluster", "show", "hgx-h200", "--set", "nvlink.GBps=.nan"]


@case("flags", "set-alias-bomb", "hgx-h200", "--set name")
def _(d: Path) -> list[str]:
    bomb = "&a [1,1,1,1,1,1,1,1,1,1]"
    return ["cluster", "show", "hgx-h200", "--set", "name=[" + bomb + "," + ",".join(["*a"] * 20000) + "]"]


@case("flags", "set-nodes-1e5", "hgx-h200", "nodes")
def _(d: Path) -> list[str]:
    return ["cluster", "show", "hgx-h200", "--set", "nodes=100000"]


@case("flags", "model-show-unknown-preset", "deepseek-v99", "unknown model preset")
def _(d: Path) -> list[str]:
    return ["model", "show", "deepseek-v99"]


@case("flags", "model-show-set-nan", "deepseek-v3", "dtype_bytes")
def _(d: Path) -> list[str]:
    return ["model", "show", "deepseek-v3", "--set", "dtype_bytes=.nan"]


@case("flags", "model-show-set-layers-1e9", "kimi-k2", "num_layers")
def _(d: Path) -> list[str]:
    return ["model", "show", "kimi-k2", "--set", "num_layers=1000000000"]


@case("flags", "set-nodes-negative", "hgx-h200", "nodes")
def _(d: Path) -> list[str]:
    return ["cluster", "show", "hgx-h200", "--set", "nodes=-1"]


@case("flags", "set-empty-key", "hgx-h200", "--set")
def _(d: Path) -> list[str]:
    return ["cluster", "show", "hgx-h200", "--set", "=3"]


@case("flags", "set-empty-segment", "hgx-h200", "--set")
def _(d: Path) -> list[str]:
    return ["cluster", "show", "hgx-h200", "--set", "gpu..x=3"]


@case("flags", "place-seed-negative", "s.yaml", "--set seed")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario())
    return ["place", "s.yaml", "--policy", "random", "--set", "seed=-1", "-o", "out/p.json"]


@case("flags", "place-seed-text", "s.yaml", "--set seed")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario())
    return ["place", "s.yaml", "--policy", "random", "--set", "seed=abc", "-o", "out/p.json"]


@case("flags", "place-unknown-option", "s.yaml", "--set bogus")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario())
    return ["place", "s.yaml", "--policy", "greedy", "--set", "bogus=1", "-o", "out/p.json"]


@case("flags", "place-bad-yaml", "--set seed")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario())
    return ["place", "s.yaml", "--policy", "random", "--set", "seed={", "-o", "out/p.json"]


@case("flags", "place-redundant-negative", "s.yaml", "--set redundant_experts")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario())
    return ["place", "s.yaml", "--policy", "greedy", "--set", "redundant_experts=-5", "-o", "out/p.json"]


@case("flags", "place-time-limit-1e400", "--set time_limit_s")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario())
    return ["place", "s.yaml", "--policy", "ilp", "--set", "time_limit_s=1e400", "-o", "out/p.json"]


@case("flags", "place-unknown-policy", "--policy")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario())
    return ["place", "s.yaml", "--policy", "nope", "-o", "out/p.json"]


@case("flags", "place-redundant-1e12", "--set redundant_experts")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario())
    return ["place", "s.yaml", "--policy", "greedy", "--set", "redundant_experts=1000000000000", "-o", "out/p.json"]


def rebalancing(d: Path) -> None:
    write(d / "s.yaml", scenario(placements=["contiguous", "greedy"], workload__synthetic__batches=4,
                                 rebalance={"policy": "greedy", "every_batches": 2, "window_batches": 1}))


@case("flags", "sweep-redundant-negative", "--redundant")
def _(d: Path) -> list[str]:
    rebalancing(d)
    return ["sweep", "s.yaml", "--redundant", "-1", "--every", "2", "-o", "out"]


@case("flags", "sweep-every-text", "--every")
def _(d: Path) -> list[str]:
    rebalancing(d)
    return ["sweep", "s.yaml", "--redundant", "0", "--every", "x", "-o", "out"]


@case("flags", "sweep-every-1e12", "s.yaml", "--every")
def _(d: Path) -> list[str]:
    rebalancing(d)
    return ["sweep", "s.yaml", "--redundant", "0", "--every", "1000000000000", "-o", "out"]


@case("flags", "sweep-window-zero", "--window")
def _(d: Path) -> list[str]:
    rebalancing(d)
    return ["sweep", "s.yaml", "--redundant", "0", "--every", "2", "--window", "0", "-o", "out"]


@case("flags", "grid-no-equals", "--grid")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario())
    return ["sweep", "s.yaml", "--grid", "cluster.nodes", "-o", "out"]


@case("flags", "grid-point-out-of-range", "s.yaml", "clusters[0].nodes", "cluster.nodes=-1")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario())
    return ["sweep", "s.yaml", "--grid", "cluster.nodes=1,-1", "-o", "out"]


@case("flags", "grid-value-nan", "--grid model.num_layers")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario())
    return ["sweep", "s.yaml", "--grid", "model.num_layers=2,.nan", "-o", "out"]


@case("scenario", "sweep-section-not-lists", "s.yaml", "sweep.cluster.nodes")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(sweep={"cluster.nodes": 4}))
    return ["sweep", "s.yaml", "-o", "out"]


@case("scenario", "sweep-section-bad-key", "s.yaml", "sweep.a..b")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(sweep={"a..b": [1]}))
    return ["sweep", "s.yaml", "-o", "out"]


@case("flags", "grid-jobs-huge", "--jobs")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario(sweep={"cluster.nodes": [1]}))
    return ["sweep", "s.yaml", "--jobs", "100000", "-o", "out"]


@case("flags", "int-flag-not-int", "--gpus")
def _(d: Path) -> list[str]:
    write(d / "l.csv", csv_log(GOOD_ROWS))
    return import_cmd("l.csv", "--gpus", "many")


@case("flags", "unknown-command", "moesim")
def _(d: Path) -> list[str]:
    return ["simulate", "x.yaml"]


@case("flags", "import-gpus-1e12", "num_gpus")
def _(d: Path) -> list[str]:
    write(d / "l.csv", csv_log(GOOD_ROWS))
    return import_cmd("l.csv", "--gpus", "1000000000000")


@case("flags", "import-gpus-2e9", "l.csv", "num_gpus")
def _(d: Path) -> list[str]:
    write(d / "l.csv", csv_log(GOOD_ROWS))
    return import_cmd("l.csv", "--gpus", "2000000000", "--tokens-per-gpu", "1")


@case("flags", "import-num-experts-zero", "num_experts")
def _(d: Path) -> list[str]:
    write(d / "l.csv", csv_log(GOOD_ROWS))
    return import_cmd("l.csv", "--num-experts", "0")


@case("flags", "import-top-k-2e40", "top_k")
def _(d: Path) -> list[str]:
    write(d / "l.csv", csv_log(GOOD_ROWS))
    return import_cmd("l.csv", "--top-k", str(2**40))


@case("flags", "import-axes", "axes")
def _(d: Path) -> list[str]:
    np.save(d / "a.npy", experts())
    return import_cmd("a.npy", "--axes", "xyz")


@case("flags", "stats-window-zero", "--window")
def _(d: Path) -> list[str]:
    npz(d / "t.npz")
    return ["trace", "stats", "t.npz", "--window", "0"]


@case("flags", "stats-window-1e30", "--window")
def _(d: Path) -> list[str]:
    npz(d / "t.npz")
    return ["trace", "stats", "t.npz", "--window", str(10**30)]


@case("flags", "stats-window-one-big-trace", "t.npz", "--window")
def _(d: Path) -> list[str]:
    npz(d / "t.npz", meta={**META, "num_experts": 20000}, compress=False)
    return ["trace", "stats", "t.npz", "--window", "1"]


@case("flags", "stats-top-negative", "--top")
def _(d: Path) -> list[str]:
    npz(d / "t.npz")
    return ["trace", "stats", "t.npz", "--top", "-1", "--json", "out/s.json"]


@case("flags", "stats-layer-out-of-range", "--layer")
def _(d: Path) -> list[str]:
    npz(d / "t.npz")
    return ["trace", "stats", "t.npz", "--layer", "99", "--plots", "out"]


@case("flags", "fit-fanout-zero", "--fanout")
def _(d: Path) -> list[str]:
    npz(d / "t.npz")
    return ["trace", "fit", "t.npz", "--fanout", "0", "-o", "out/p.yaml"]


@case("flags", "fit-rounds-negative", "--rounds")
def _(d: Path) -> list[str]:
    npz(d / "t.npz")
    return ["trace", "fit", "t.npz", "--rounds", "-1", "-o", "out/p.yaml"]


@case("flags", "fit-rounds-1e12", "t.npz", "--rounds")
def _(d: Path) -> list[str]:
    npz(d / "t.npz")
    return ["trace", "fit", "t.npz", "--rounds", "1000000000000", "-o", "out/p.yaml"]


@case("flags", "fit-seed-negative", "--seed")
def _(d: Path) -> list[str]:
    npz(d / "t.npz")
    return ["trace", "fit", "t.npz", "--seed", "-1", "-o", "out/p.yaml"]


@case("flags", "fit-calibration-tokens-huge", "t.npz", "--calibration-tokens")
def _(d: Path) -> list[str]:
    npz(d / "t.npz")
    return ["trace", "fit", "t.npz", "--calibration-tokens", "2000000000", "-o", "out/p.yaml"]


@case("flags", "fit-check-tokens-huge", "t.npz", "--check-tokens")
def _(d: Path) -> list[str]:
    npz(d / "t.npz")
    return ["trace", "fit", "t.npz", "--rounds", "0", "--check-tokens", "2000000000", "-o", "out/p.yaml"]


@case("flags", "generate-gpus-zero", "--gpus")
def _(d: Path) -> list[str]:
    return ["trace", "generate", "mixtral-8x7b-c4", "--gpus", "0", "-o", "out/t.npz"]


@case("flags", "generate-batches-1e12", "--batches")
def _(d: Path) -> list[str]:
    return ["trace", "generate", "mixtral-8x7b-c4", "--batches", "1000000000000", "-o", "out/t.npz"]


@case("flags", "generate-tokens-huge", "mixtral-8x7b-c4")
def _(d: Path) -> list[str]:
    return ["trace", "generate", "mixtral-8x7b-c4", "--tokens-per-gpu", "2000000000", "--gpus", "1000",
            "-o", "out/t.npz"]


@case("flags", "generate-seed-negative", "--seed")
def _(d: Path) -> list[str]:
    return ["trace", "generate", "mixtral-8x7b-c4", "--seed", "-5", "-o", "out/t.npz"]


@case("flags", "calibrate-preset-unknown", "--preset")
def _(d: Path) -> list[str]:
    write(d / "a.json", json.dumps(a2a_bench()))
    return calibrate_cmd("a.json", "--preset", "nope")


# (bench needs torch: without it every case below is the one-line "needs PyTorch" error, so none names a flag)
@case("flags", "bench-nproc-zero")
def _(d: Path) -> list[str]:
    return ["bench", "a2a", "--cpu", "--nproc", "0", "-o", "out"]


@case("flags", "bench-nproc-1e5")
def _(d: Path) -> list[str]:
    return ["bench", "a2a", "--cpu", "--nproc", "100000", "-o", "out"]


@case("flags", "bench-dtypes")
def _(d: Path) -> list[str]:
    return ["bench", "moe", "--cpu", "--quick", "--dtypes", "fp4", "-o", "out"]


@case("flags", "bench-scenario-alias-bomb")
def _(d: Path) -> list[str]:
    lol = ["a0: &a0 [1,1,1,1,1,1,1,1,1,1]"] + [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]"
                                               for i in range(1, 8)]
    write(d / "s.yaml", "\n".join(lol) + "\n" + scenario_text())
    return ["bench", "ffn", "--cpu", "--scenario", "s.yaml", "-o", "out"]


@case("flags", "bench-a2a-with-scenario")
def _(d: Path) -> list[str]:
    write(d / "s.yaml", scenario())
    return ["bench", "a2a", "--cpu", "--scenario", "s.yaml", "-o", "out"]


# ================================================================================================ placement JSON

GOOD_PLACEMENT = {"format": "moesim.placement/1", "num_gpus": 8, "policy": "x",
                  "layers": [{"expert_gpus": [[e // 2] for e in range(16)]} for _ in range(4)]}


def with_placement(d: Path, content: Any) -> list[str]:
    write(d / "p.json", content if isinstance(content, (str, bytes)) else json.dumps(content))
    write(d / "s.yaml", scenario(placements=["contiguous", {"file": "p.json"}]))
    return validate()


def placement(**changes: Any) -> dict[str, Any]:
    return {**json.loads(json.dumps(GOOD_PLACEMENT)), **changes}


@case("placement", "not-json", "p.json")
def _(d: Path) -> list[str]:
    return with_placement(d, "{not json")


@case("placement", "not-utf8", "p.json", "byte 0x")
def _(d: Path) -> list[str]:
    return with_placement(d, b'{"format": "\xff"}')


@case("placement", "duplicate-key", "p.json", "num_gpus")
def _(d: Path) -> list[str]:
    return with_placement(d, json.dumps(placement())[:-1] + ', "num_gpus": 4}')


@case("placement", "nan", "p.json", "num_gpus")
def _(d: Path) -> list[str]:
    return with_placement(d, json.dumps(placement()).replace('"num_gpus": 8', '"num_gpus": NaN'))


@case("placement", "infinity", "p.json", "info.x")
def _(d: Path) -> list[str]:
    return with_placement(d, json.dumps(placement()).replace('"policy": "x"', '"policy": "x", "info": {"x": Infinity}'))


@case("placement", "deep-nesting", "p.json")
def _(d: Path) -> list[str]:
    return with_placement(d, '{"info": ' + "[" * 100000 + "]" * 100000 + "}")


@case("placement", "int-beyond-64-bits", "p.json", "num_gpus")
def _(d: Path) -> list[str]:
    return with_placement(d, json.dumps(placement(num_gpus=2**80)))


@case("placement", "int-4300-digits", "p.json")
def _(d: Path) -> list[str]:
    return with_placement(d, json.dumps(placement()).replace('"num_gpus": 8', '"num_gpus": ' + "7" * 5000))


@case("placement", "num-gpus-zero", "p.json", "num_gpus")
def _(d: Path) -> list[str]:
    return with_placement(d, placement(num_gpus=0))


@case("placement", "layers-empty", "p.json", "layers")
def _(d: Path) -> list[str]:
    return with_placement(d, placement(layers=[]))


@case("placement", "gpu-strings", "p.json", "layers[0].expert_gpus[0]")
def _(d: Path) -> list[str]:
    p = placement()
    p["layers"][0]["expert_gpus"][0] = ["zero"]
    return with_placement(d, p)


@case("placement", "gpu-2e40", "p.json", "layers[1].expert_gpus[3]")
def _(d: Path) -> list[str]:
    p = placement()
    p["layers"][1]["expert_gpus"][3] = [2**40]
    return with_placement(d, p)


@case("placement", "gpu-negative", "p.json", "layers[0].expert_gpus[2]")
def _(d: Path) -> list[str]:
    p = placement()
    p["layers"][0]["expert_gpus"][2] = [-5]
    return with_placement(d, p)


@case("placement", "copies-100k", "p.json", "layers[0].expert_gpus[0]")
def _(d: Path) -> list[str]:
    p = placement()
    p["layers"][0]["expert_gpus"][0] = list(range(100_000))
    return with_placement(d, p)


@case("placement", "top-level-list", "p.json")
def _(d: Path) -> list[str]:
    return with_placement(d, "[1, 2, 3]")


@case("placement", "wrong-format", "p.json", "format")
def _(d: Path) -> list[str]:
    return with_placement(d, placement(format="moesim.placement/99"))


@case("placement", "lone-surrogate", "p.json", "policy")
def _(d: Path) -> list[str]:
    return with_placement(d, json.dumps(placement()).replace('"policy": "x"', '"policy": "\\udc80"'))


@case("placement", "wrong-gpu-count", "p.json", "num_ranks")
def _(d: Path) -> list[str]:
    return with_placement(d, placement(num_gpus=4, layers=[{"expert_gpus": [[e % 4] for e in range(16)]}] * 4))


# ================================================================================================ .npz traces

@case("trace-npz", "random-bytes", "t.npz")
def _(d: Path) -> list[str]:
    write(d / "t.npz", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    return trace_scenario(d)


@case("trace-npz", "truncated-zip", "t.npz")
def _(d: Path) -> list[str]:
    raw = npz(d / "t.npz").read_bytes()
    write(d / "t.npz", raw[: len(raw) // 2])
    return ["trace", "stats", "t.npz"]


@case("trace-npz", "corrupt-deflate", "t.npz", "experts")
def _(d: Path) -> list[str]:
    big = np.tile(experts(), (64, 1, 1))
    corrupt_member(npz(d / "t.npz", experts=big), "experts.npy", 0.3)
    return ["trace", "stats", "t.npz"]


@case("trace-npz", "corrupt-deflate-in-scenario", "t.npz")
def _(d: Path) -> list[str]:
    big = np.tile(experts(), (64, 1, 1))
    corrupt_member(npz(d / "t.npz", experts=big), "experts.npy", 0.6)
    return trace_scenario(d)


@case("trace-npz", "bad-crc-stored", "t.npz")
def _(d: Path) -> list[str]:
    corrupt_member(npz(d / "t.npz", compress=False, home=(np.arange(64) % 8).astype(np.int32)), "home.npy", 0.9)
    return ["trace", "fit", "t.npz", "-o", "out/p.yaml"]


@case("trace-npz", "header-claims-1e12-rows-stored", "t.npz", "experts")
def _(d: Path) -> list[str]:
    zip_of(d / "t.npz", {"experts.npy": npy_bytes((10**12, 4, 2), data=experts().tobytes()), "meta.npy": meta_npy()})
    return trace_scenario(d)


@case("trace-npz", "header-claims-1e12-rows-deflated", "t.npz", "experts")
def _(d: Path) -> list[str]:
    zip_of(d / "t.npz", {"experts.npy": npy_bytes((10**12, 4, 2), data=experts().tobytes()), "meta.npy": meta_npy()},
           compress=True)
    return ["trace", "stats", "t.npz"]


@case("trace-npz", "zip64-size-lie", "t.npz")
def _(d: Path) -> list[str]:
    """Header and ZIP directory both claim 10^12 rows; the data is a few bytes."""
    path = zip_of(d / "t.npz", {"experts.npy": npy_bytes((10**12, 4, 2), data=experts().tobytes()),
                                "meta.npy": meta_npy()}, compress=True)
    raw = bytearray(path.read_bytes())
    claimed = len(npy_bytes((10**12, 4, 2))) + 10**12 * 16
    cd = raw.rfind(b"PK\x01\x02", 0, raw.rfind(b"PK\x05\x06"))  # the second member's central entry
    first = raw.find(b"PK\x01\x02")
    assert first != -1 and cd != -1
    raw[first + 24: first + 28] = struct.pack("<I", claimed % 2**32)  # uncompressed size, truncated: a lie
    path.write_bytes(bytes(raw))
    return ["trace", "stats", "t.npz"]


@case("trace-npz", "meta-not-json", "t.npz", "meta")
def _(d: Path) -> list[str]:
    npz(d / "t.npz", meta="{not json")
    return trace_scenario(d)


@case("trace-npz", "meta-duplicate-key", "t.npz", "meta")
def _(d: Path) -> list[str]:
    npz(d / "t.npz", meta=json.dumps(META)[:-1] + ', "num_experts": 17}')
    return ["trace", "stats", "t.npz"]


@case("trace-npz", "meta-nan", "t.npz", "meta.num_layers")
def _(d: Path) -> list[str]:
    npz(d / "t.npz", meta=json.dumps(META).replace('"num_layers": 4', '"num_layers": NaN'))
    return ["trace", "stats", "t.npz"]


@case("trace-npz", "meta-experts-2e40", "t.npz", "meta.num_experts")
def _(d: Path) -> list[str]:
    npz(d / "t.npz", meta={**META, "num_experts": 2**40})
    return ["trace", "stats", "t.npz"]


@case("trace-npz", "meta-experts-1e6-stats", "t.npz")
def _(d: Path) -> list[str]:
    npz(d / "t.npz", meta={**META, "num_experts": 1_000_000})
    return ["trace", "stats", "t.npz"]


@case("trace-npz", "meta-deeply-nested", "t.npz", "meta")
def _(d: Path) -> list[str]:
    npz(d / "t.npz", meta=json.dumps(META)[:-1] + ', "x": ' + "[" * 50000 + "]" * 50000 + "}")
    return ["trace", "stats", "t.npz"]


@case("trace-npz", "meta-array-not-string", "t.npz", "meta")
def _(d: Path) -> list[str]:
    np.savez(d / "t.npz", experts=experts(), meta=np.arange(5))
    return ["trace", "stats", "t.npz"]


@case("trace-npz", "experts-float", "t.npz", "experts")
def _(d: Path) -> list[str]:
    npz(d / "t.npz", experts=experts().astype(float))
    return trace_scenario(d)


@case("trace-npz", "experts-object-pickle", "t.npz", "experts")
def _(d: Path) -> list[str]:
    zip_of(d / "t.npz", {"experts.npy": npy_bytes((2,), descr="|O", data=b"\x80\x04N."), "meta.npy": meta_npy()})
    return trace_scenario(d)


@case("trace-npz", "expert-id-out-of-range", "t.npz", "experts")
def _(d: Path) -> list[str]:
    e = experts()
    e[5, 1, 0] = 99
    npz(d / "t.npz", experts=e)
    return trace_scenario(d)


@case("trace-npz", "expert-id-uint64-max", "t.npz", "experts")
def _(d: Path) -> list[str]:
    e = experts().astype(np.uint64)
    e[0, 0, 0] = 2**64 - 1
    npz(d / "t.npz", experts=e)
    return ["trace", "stats", "t.npz"]


@case("trace-npz", "weights-nan", "t.npz", "weights")
def _(d: Path) -> list[str]:
    w = np.full(experts().shape, 0.5, dtype=np.float32)
    w[3, 2, 1] = np.nan
    npz(d / "t.npz", weights=w)
    return trace_scenario(d)


@case("trace-npz", "weights-negative-inf", "t.npz", "weights")
def _(d: Path) -> list[str]:
    w = np.full(experts().shape, 0.5)
    w[0, 0, 0] = -np.inf
    npz(d / "t.npz", weights=w)
    return ["trace", "stats", "t.npz"]


@case("trace-npz", "weights-strings", "t.npz", "weights")
def _(d: Path) -> list[str]:
    npz(d / "t.npz", weights=np.full(experts().shape, "x"))
    return ["trace", "stats", "t.npz"]


@case("trace-npz", "batch-id-2e40", "t.npz", "batch")
def _(d: Path) -> list[str]:
    b = np.zeros(64, dtype=np.int64)
    b[-1] = 2**40
    npz(d / "t.npz", batch=b)
    return trace_scenario(d)


@case("trace-npz", "batch-id-2e31-sparse", "s.yaml", "t.npz", "workload")
def _(d: Path) -> list[str]:
    b = np.zeros(64, dtype=np.int64)
    b[-1] = 2**31 - 1
    npz(d / "t.npz", batch=b)
    return trace_scenario(d)


@case("trace-npz", "home-negative", "t.npz", "home")
def _(d: Path) -> list[str]:
    h = np.zeros(64, dtype=np.int32)
    h[7] = -3
    npz(d / "t.npz", home=h)
    return trace_scenario(d)


@case("trace-npz", "home-for-8-on-16-gpus", "t.npz", "home")
def _(d: Path) -> list[str]:
    npz(d / "t.npz", home=(np.arange(64) % 8).astype(np.int32), batch=(np.arange(64) // 32).astype(np.int32),
        meta={**META, "packing": {"num_gpus": 8, "tokens_per_gpu": 4, "assign": "least_loaded"}})
    return trace_scenario(d, clusters=[{"preset": "hgx-h200", "nodes": 2}])


@case("trace-npz", "home-few-requests-packing-lies", "t.npz", "home")
def _(d: Path) -> list[str]:
    npz(d / "t.npz", home=np.zeros(64, dtype=np.int32), batch=np.zeros(64, dtype=np.int32),
        meta={**META, "packing": {"num_gpus": [8]}})
    return trace_scenario(d)


@case("trace-npz", "zero-tokens", "t.npz", "experts")
def _(d: Path) -> list[str]:
    npz(d / "t.npz", experts=np.zeros((0, 4, 2), dtype=np.int16))
    return trace_scenario(d)


@case("trace-npz", "zero-tokens-stats", "t.npz", "experts")
def _(d: Path) -> list[str]:
    npz(d / "t.npz", experts=np.zeros((0, 4, 2), dtype=np.int16))
    return ["trace", "stats", "t.npz"]


@case("trace-npz", "unknown-member", "t.npz", "extra")
def _(d: Path) -> list[str]:
    npz(d / "t.npz", extra=np.arange(3))
    return trace_scenario(d)


@case("trace-npz", "npy-version-9", "t.npz", "experts")
def _(d: Path) -> list[str]:
    raw = bytearray(npy_bytes((64, 4, 2), data=experts().tobytes()))
    raw[6] = 9
    zip_of(d / "t.npz", {"experts.npy": bytes(raw), "meta.npy": meta_npy()})
    return trace_scenario(d)


@case("trace-npz", "npy-header-garbage", "t.npz", "experts")
def _(d: Path) -> list[str]:
    raw = b"\x93NUMPY\x01\x00" + struct.pack("<H", 54) + b"{'descr': __import__('os'), 'shape': (1,)}".ljust(53) + b"\n"
    zip_of(d / "t.npz", {"experts.npy": raw, "meta.npy": meta_npy()})
    return trace_scenario(d)


@case("trace-npz", "shape-mismatch", "t.npz", "experts")
def _(d: Path) -> list[str]:
    npz(d / "t.npz", experts=np.zeros((8, 3, 2), dtype=np.int16))
    return trace_scenario(d)


@case("trace-npz", "model-mismatch", "t.npz", "meta.num_experts")
def _(d: Path) -> list[str]:
    npz(d / "t.npz", meta={**META, "num_experts": 32})
    return trace_scenario(d)


@case("trace-npz", "files-one-bad", "b.npz")
def _(d: Path) -> list[str]:
    npz(d / "a.npz")
    write(d / "b.npz", b"PK\x03\x04 not really")
    write(d / "s.yaml", scenario(workload={"trace": {"files": ["a.npz", "b.npz"], "tokens_per_gpu": 8}}))
    return validate()


@case("trace-npz", "raw-npy-as-trace", "t.npz")
def _(d: Path) -> list[str]:
    write(d / "t.npz", npy_bytes((64, 4, 2), data=experts().tobytes()))
    return ["trace", "fit", "t.npz", "-o", "out/p.yaml"]


# ================================================================================================ .npy / raw imports

@case("trace-npy", "header-claims-1e12-rows", "a.npy")
def _(d: Path) -> list[str]:
    write(d / "a.npy", npy_bytes((10**12, 4, 2), data=experts().tobytes()))
    return import_cmd("a.npy")


@case("trace-npy", "header-claims-2e62-bytes", "a.npy")
def _(d: Path) -> list[str]:
    write(d / "a.npy", npy_bytes((2**31, 2**31, 2), descr="<i8", data=b"\0" * 64))
    return import_cmd("a.npy")


@case("trace-npy", "object-dtype", "a.npy")
def _(d: Path) -> list[str]:
    write(d / "a.npy", npy_bytes((3,), descr="|O", data=b"\x80\x04N."))
    return import_cmd("a.npy")


@case("trace-npy", "float-ids", "a.npy", "experts")
def _(d: Path) -> list[str]:
    np.save(d / "a.npy", experts().astype(np.float32))
    return import_cmd("a.npy")


@case("trace-npy", "two-axes", "a.npy", "experts")
def _(d: Path) -> list[str]:
    np.save(d / "a.npy", np.zeros((4, 4), dtype=np.int32))
    return import_cmd("a.npy")


@case("trace-npy", "ids-2e40", "a.npy", "experts")
def _(d: Path) -> list[str]:
    e = experts().astype(np.int64)
    e[1, 1, 1] = 2**40
    np.save(d / "a.npy", e)
    return import_cmd("a.npy")


@case("trace-npy", "zero-top-k", "a.npy", "experts")
def _(d: Path) -> list[str]:
    np.save(d / "a.npy", np.zeros((5, 2, 0), dtype=np.int32))
    return import_cmd("a.npy")


@case("trace-npy", "zero-tokens", "a.npy")
def _(d: Path) -> list[str]:
    np.save(d / "a.npy", np.zeros((0, 2, 2), dtype=np.int32))
    return import_cmd("a.npy")


@case("trace-npy", "truncated-data", "a.npy")
def _(d: Path) -> list[str]:
    write(d / "a.npy", npy_bytes((64, 4, 2), data=experts().tobytes()[:100]))
    return import_cmd("a.npy")


@case("trace-npy", "text-not-npy", "a.npy")
def _(d: Path) -> list[str]:
    write(d / "a.npy", "layer,experts\n0,[1 2]\n")
    return import_cmd("a.npy")


@case("trace-npy", "npz-without-experts", "a.npz")
def _(d: Path) -> list[str]:
    np.savez(d / "a.npz", other=np.arange(3))
    return import_cmd("a.npz")


@case("trace-npy", "npz-weights-strings", "a.npz", "weights")
def _(d: Path) -> list[str]:
    np.savez(d / "a.npz", topk_ids=experts(), topk_weights=np.full(experts().shape, "w"))
    return import_cmd("a.npz")


@case("trace-npy", "npz-corrupt-deflate", "a.npz", "topk_ids")
def _(d: Path) -> list[str]:
    np.savez_compressed(d / "a.npz", topk_ids=np.tile(experts(), (64, 1, 1)))
    corrupt_member(d / "a.npz", "topk_ids.npy", 0.4)
    return import_cmd("a.npz")


# ================================================================================================ CSV logs

@case("trace-csv", "not-utf8", "l.csv", "byte 0x")
def _(d: Path) -> list[str]:
    write(d / "l.csv", csv_log(GOOD_ROWS).encode() + b'0,0,\xff\xfe,"[1, 2]"\n')
    return import_cmd("l.csv")


@case("trace-csv", "ids-20-digits", "l.csv", "line 3")
def _(d: Path) -> list[str]:
    rows = list(GOOD_ROWS)
    rows[1] = (0, 0, [1, 99999999999999999999])
    write(d / "l.csv", csv_log(rows))
    return import_cmd("l.csv")


@case("trace-csv", "ids-2e40", "l.csv", "line")
def _(d: Path) -> list[str]:
    rows = list(GOOD_ROWS)
    rows[2] = (0, 0, [1, 2**40])
    write(d / "l.csv", csv_log(rows))
    return import_cmd("l.csv")


@case("trace-csv", "layer-2e40", "l.csv", "line 2")
def _(d: Path) -> list[str]:
    rows = list(GOOD_ROWS)
    rows[0] = (2**40, 0, [1, 2])
    write(d / "l.csv", csv_log(rows))
    return import_cmd("l.csv")


@case("trace-csv", "request-30-digits", "l.csv", "line 4")
def _(d: Path) -> list[str]:
    text = csv_log(GOOD_ROWS).splitlines()
    text[3] = "0," + "9" * 30 + ',tok,"[1, 2]"'
    write(d / "l.csv", "\n".join(text) + "\n")
    return import_cmd("l.csv")


@case("trace-csv", "position-huge", "l.csv", "line 2")
def _(d: Path) -> list[str]:
    write(d / "l.csv", "layer,position,experts\n" + f'0,{2**50},"[1, 2]"\n0,1,"[1, 2]"\n')
    return import_cmd("l.csv")


@case("trace-csv", "weights-nan", "l.csv", "line 2")
def _(d: Path) -> list[str]:
    write(d / "l.csv", 'layer,experts,weights\n0,"[1, 2]","[nan, 0.5]"\n1,"[1, 2]","[0.5, 0.5]"\n')
    return import_cmd("l.csv")


@case("trace-csv", "weights-inf", "l.csv", "line 2")
def _(d: Path) -> list[str]:
    write(d / "l.csv", 'layer,experts,weights\n0,"[1, 2]","[inf, 0.5]"\n1,"[1, 2]","[0.5, 0.5]"\n')
    return import_cmd("l.csv")


@case("trace-csv", "weights-count-mismatch", "l.csv", "line 2")
def _(d: Path) -> list[str]:
    write(d / "l.csv", 'layer,experts,weights\n0,"[1, 2]","[0.5]"\n')
    return import_cmd("l.csv")


@case("trace-csv", "header-only", "l.csv")
def _(d: Path) -> list[str]:
    write(d / "l.csv", "layer,request,token,experts\n")
    return import_cmd("l.csv")


@case("trace-csv", "empty", "l.csv")
def _(d: Path) -> list[str]:
    write(d / "l.csv", "")
    return import_cmd("l.csv")


@case("trace-csv", "field-over-csv-limit", "l.csv")
def _(d: Path) -> list[str]:
    write(d / "l.csv", 'layer,experts,weights\n0,"[1, 2]","[' + "0.5, " * 60_000 + '0.5]"\n')
    return import_cmd("l.csv")


@case("trace-csv", "nul-bytes", "l.csv")
def _(d: Path) -> list[str]:
    write(d / "l.csv", csv_log(GOOD_ROWS).replace("\n0,", "\n0\0,", 1))
    return import_cmd("l.csv", "--num-experts", "4")


@case("trace-csv", "negative-id", "l.csv", "line")
def _(d: Path) -> list[str]:
    rows = list(GOOD_ROWS)
    rows[0] = (0, 0, [-7, 2])
    write(d / "l.csv", csv_log(rows))
    return import_cmd("l.csv")


@case("trace-csv", "id-over-num-experts", "l.csv", "line")
def _(d: Path) -> list[str]:
    write(d / "l.csv", csv_log(GOOD_ROWS))
    return import_cmd("l.csv", "--num-experts", "2")


@case("trace-csv", "no-expert-column", "l.csv", "line 1")
def _(d: Path) -> list[str]:
    write(d / "l.csv", "layer,request,token\n0,0,x\n")
    return import_cmd("l.csv")


@case("trace-csv", "gz-corrupt-deflate", "l.csv.gz")
def _(d: Path) -> list[str]:
    raw = bytearray(gzip.compress((csv_log(GOOD_ROWS) * 200).encode()))
    for i in range(20, 60):
        raw[i] ^= 0x5A
    write(d / "l.csv.gz", bytes(raw))
    return import_cmd("l.csv.gz")


@case("trace-csv", "gz-truncated", "l.csv.gz")
def _(d: Path) -> list[str]:
    raw = gzip.compress((csv_log(GOOD_ROWS) * 200).encode())
    write(d / "l.csv.gz", raw[: len(raw) // 2])
    return import_cmd("l.csv.gz")


@case("trace-csv", "gz-not-gzip", "l.csv.gz")
def _(d: Path) -> list[str]:
    write(d / "l.csv.gz", csv_log(GOOD_ROWS))
    return import_cmd("l.csv.gz")


@case("trace-csv", "gz-bomb", "l.csv.gz", MOESIM_MAX_MEMORY_GB="1")
def _(d: Path) -> list[str]:
    """A 100 KB file that decompresses to 100 MB of one repeated line: over the 1 GB limit once parsed."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = b"0,0,tok,\"[1, 2]\"\n" * 60_000
    parts = [comp.compress(b"layer,request,token,experts\n")] + [comp.compress(chunk) for _ in range(100)]
    write(d / "l.csv.gz", b"".join(parts) + comp.flush())
    return import_cmd("l.csv.gz")


# ================================================================================================ JSONL logs

@case("trace-jsonl", "not-json", "l.jsonl", "line 2")
def _(d: Path) -> list[str]:
    write(d / "l.jsonl", jsonl_log(GOOD_JSONL[:1]) + "{oops\n")
    return import_cmd("l.jsonl")


@case("trace-jsonl", "deep-nesting", "l.jsonl", "line 2")
def _(d: Path) -> list[str]:
    write(d / "l.jsonl", jsonl_log(GOOD_JSONL[:1]) + '{"layer": 0, "token": 1, "experts": '
          + "[" * 100000 + "]" * 100000 + "}\n")
    return import_cmd("l.jsonl")


@case("trace-jsonl", "request-deep-nesting", "l.jsonl", "line 1")
def _(d: Path) -> list[str]:
    write(d / "l.jsonl", '{"layer": 0, "token": 0, "experts": [1, 2], "request": ' + "[" * 900 + "]" * 900 + "}\n")
    return import_cmd("l.jsonl")


@case("trace-jsonl", "id-beyond-64-bits", "l.jsonl", "line 3")
def _(d: Path) -> list[str]:
    recs = [dict(r) for r in GOOD_JSONL]
    recs[2]["experts"] = [1, 2**70]
    write(d / "l.jsonl", jsonl_log(recs))
    return import_cmd("l.jsonl")


@case("trace-jsonl", "id-20-digits-uniform", "l.jsonl", "line 1")
def _(d: Path) -> list[str]:
    write(d / "l.jsonl", "".join(f'{{"layer": {lay}, "token": 0, "experts": [1, 99999999999999999999]}}\n'
                                 for lay in range(2)))
    return import_cmd("l.jsonl")


@case("trace-jsonl", "layer-2e40", "l.jsonl", "line 1")
def _(d: Path) -> list[str]:
    recs = [dict(r) for r in GOOD_JSONL]
    recs[0]["layer"] = 2**40
    write(d / "l.jsonl", jsonl_log(recs))
    return import_cmd("l.jsonl")


@case("trace-jsonl", "token-huge-float", "l.jsonl", "line 1")
def _(d: Path) -> list[str]:
    write(d / "l.jsonl", "".join(f'{{"layer": {lay}, "token": 1e30, "experts": [1.0, 2.5]}}\n' for lay in range(2)))
    return import_cmd("l.jsonl")


@case("trace-jsonl", "weights-nan", "l.jsonl", "line")
def _(d: Path) -> list[str]:
    recs = [{**r, "weights": [0.5, 0.5]} for r in GOOD_JSONL]
    write(d / "l.jsonl", jsonl_log(recs).replace("0.5]", "NaN]", 1))
    return import_cmd("l.jsonl")


@case("trace-jsonl", "weights-infinity-uniform", "l.jsonl", "line")
def _(d: Path) -> list[str]:
    recs = [{**r, "weights": [0.5, 0.5]} for r in GOOD_JSONL]
    write(d / "l.jsonl", jsonl_log(recs).replace("0.5]", "Infinity]"))
    return import_cmd("l.jsonl")


@case("trace-jsonl", "weights-strings", "l.jsonl", "line 1")
def _(d: Path) -> list[str]:
    recs = [{**r, "weights": ["a", "b"]} for r in GOOD_JSONL]
    write(d / "l.jsonl", jsonl_log(recs))
    return import_cmd("l.jsonl")


@case("trace-jsonl", "duplicate-key", "l.jsonl", "line 1")
def _(d: Path) -> list[str]:
    lines = jsonl_log(GOOD_JSONL).splitlines()
    lines[0] = lines[0][:-1] + ', "layer": 1}'
    write(d / "l.jsonl", "\n".join(lines) + "\n")
    return import_cmd("l.jsonl")


@case("trace-jsonl", "lone-surrogate-request", "l.jsonl", "line 1")
def _(d: Path) -> list[str]:
    write(d / "l.jsonl", jsonl_log([{**r, "request": "r"} for r in GOOD_JSONL]).replace('"r"', '"\\ud800"'))
    return import_cmd("l.jsonl")


@case("trace-jsonl", "token-negative", "l.jsonl", "line 1")
def _(d: Path) -> list[str]:
    recs = [dict(r) for r in GOOD_JSONL]
    recs[0]["token"] = -4
    write(d / "l.jsonl", jsonl_log(recs))
    return import_cmd("l.jsonl")


@case("trace-jsonl", "layer-string", "l.jsonl", "line 1")
def _(d: Path) -> list[str]:
    write(d / "l.jsonl", '{"layer": "zero", "token": 0, "experts": [1, 2]}\n')
    return import_cmd("l.jsonl")


@case("trace-jsonl", "top-level-array", "l.jsonl", "line 1")
def _(d: Path) -> list[str]:
    write(d / "l.jsonl", "[1, 2, 3]\n")
    return import_cmd("l.jsonl")


@case("trace-jsonl", "empty", "l.jsonl")
def _(d: Path) -> list[str]:
    write(d / "l.jsonl", "\n\n")
    return import_cmd("l.jsonl")


@case("trace-jsonl", "not-utf8", "l.jsonl", "byte 0x")
def _(d: Path) -> list[str]:
    write(d / "l.jsonl", jsonl_log(GOOD_JSONL).encode("utf-16"))
    return import_cmd("l.jsonl")


@case("trace-jsonl", "gz-corrupt", "l.jsonl.gz")
def _(d: Path) -> list[str]:
    raw = bytearray(gzip.compress(jsonl_log(GOOD_JSONL * 100).encode()))
    raw[-30:-10] = bytes(20)
    write(d / "l.jsonl.gz", bytes(raw))
    return import_cmd("l.jsonl.gz")


# ================================================================================================ calibration JSON

def bench(d: Path, data: Any, name: str = "b.json") -> list[str]:
    write(d / name, data if isinstance(data, (str, bytes)) else json.dumps(data))
    return calibrate_cmd(name)


@case("calibrate", "a2a-ms-zero", "b.json", "uniform[2].ms_median_max_over_ranks")
def _(d: Path) -> list[str]:
    data = a2a_bench()
    data["uniform"][2]["ms_median_max_over_ranks"] = 0
    return bench(d, data)


@case("calibrate", "a2a-ms-negative", "b.json", "p2p[0].ms")
def _(d: Path) -> list[str]:
    data = a2a_bench()
    data["p2p"][0]["ms"] = -0.5
    return bench(d, data)


@case("calibrate", "a2a-ms-nan", "b.json", "uniform[1].ms_median_max_over_ranks")
def _(d: Path) -> list[str]:
    data = a2a_bench()
    data["uniform"][1]["ms_median_max_over_ranks"] = float("nan")
    return bench(d, data)


@case("calibrate", "a2a-bytes-missing", "b.json", "uniform[0].bytes_per_pair")
def _(d: Path) -> list[str]:
    data = a2a_bench()
    del data["uniform"][0]["bytes_per_pair"]
    return bench(d, data)


@case("calibrate", "a2a-bytes-string", "b.json", "uniform[3].bytes_per_pair")
def _(d: Path) -> list[str]:
    data = a2a_bench()
    data["uniform"][3]["bytes_per_pair"] = "1 MB"
    return bench(d, data)


@case("calibrate", "a2a-world-1e9", "b.json", "world")
def _(d: Path) -> list[str]:
    return bench(d, a2a_bench(world=10**9))


@case("calibrate", "a2a-world-zero", "b.json", "world")
def _(d: Path) -> list[str]:
    return bench(d, a2a_bench(world=0))


@case("calibrate", "a2a-skew-shape", "b.json", "skew[0].bytes_matrix")
def _(d: Path) -> list[str]:
    data = a2a_bench()
    data["skew"][0]["bytes_matrix"] = [[1, 2, 3]]
    return bench(d, data)


@case("calibrate", "a2a-skew-rank-ms-negative", "b.json", "skew[0].ms_median_per_rank[1]")
def _(d: Path) -> list[str]:
    data = a2a_bench()
    data["skew"][0]["ms_median_per_rank"] = [0.05, -1]
    return bench(d, data)


@case("calibrate", "ffn-tokens-zero", "b.json", "single.m.rows[0][0]")
def _(d: Path) -> list[str]:
    data = ffn_bench()
    data["single"]["m"]["rows"][0] = [0, 0.1]
    return bench(d, data)


@case("calibrate", "ffn-ms-nan", "b.json", "single.m.rows[3][1]")
def _(d: Path) -> list[str]:
    data = ffn_bench()
    data["single"]["m"]["rows"][3][1] = float("nan")
    return bench(d, data)


@case("calibrate", "ffn-d-model-string", "b.json", "single.m.d_model")
def _(d: Path) -> list[str]:
    data = ffn_bench()
    data["single"]["m"]["d_model"] = "4096"
    return bench(d, data)


@case("calibrate", "ffn-d-model-2e40", "b.json", "single.m.d_model")
def _(d: Path) -> list[str]:
    data = ffn_bench()
    data["single"]["m"]["d_model"] = 2**40
    return bench(d, data)


@case("calibrate", "ffn-multi-unknown-shape", "b.json", "multi[0].shape")
def _(d: Path) -> list[str]:
    data = ffn_bench()
    data["multi"][0]["shape"] = "nope"
    return bench(d, data)


@case("calibrate", "ffn-multi-load-negative", "b.json", "multi[0].loads[1]")
def _(d: Path) -> list[str]:
    data = ffn_bench()
    data["multi"][0]["loads"][1] = -16
    return bench(d, data)


@case("calibrate", "moe-step-negative", "b.json", "records[0].steps_ms.router")
def _(d: Path) -> list[str]:
    return bench(d, {"format": "moesim.bench.moe/1", "records": [moe_record(steps_ms={"router": -0.1,
                                                                                    "gemm_gate_up": 0.2})]})


@case("calibrate", "moe-rows-length", "b.json", "records[0].rows_per_expert")
def _(d: Path) -> list[str]:
    return bench(d, {"format": "moesim.bench.moe/1", "records": [moe_record(rows_per_expert=[1, 2])]})


@case("calibrate", "moe-total-missing", "b.json", "records[0].total_ms")
def _(d: Path) -> list[str]:
    r = moe_record()
    del r["total_ms"]
    return bench(d, {"format": "moesim.bench.moe/1", "records": [r]})


@case("calibrate", "moe-experts-1e12", "b.json", "records[0].num_experts")
def _(d: Path) -> list[str]:
    return bench(d, {"format": "moesim.bench.moe/1", "records": [moe_record(num_experts=10**15)]})


@case("calibrate", "attention-tp-zero", "b.json", "records[0].tp")
def _(d: Path) -> list[str]:
    return bench(d, {"shapes": {"s": {"d_model": 256, "n_heads": 4, "n_kv_heads": 4, "head_dim": 64}},
                     "records": [{"part": "core", "shape": "s", "tp": 0, "phase": "prefill", "seq_len": 512,
                                  "tokens": 512, "median_ms": 0.1}]})


@case("calibrate", "attention-ms-negative", "b.json", "records[0].median_ms")
def _(d: Path) -> list[str]:
    return bench(d, {"shapes": {"s": {"d_model": 256, "n_heads": 4, "n_kv_heads": 4, "head_dim": 64}},
                     "records": [{"part": "core", "shape": "s", "tp": 1, "phase": "prefill", "seq_len": 512,
                                  "tokens": 512, "median_ms": -3}]})


@case("calibrate", "attention-dims-huge", "b.json", "shapes.s.d_model")
def _(d: Path) -> list[str]:
    return bench(d, {"shapes": {"s": {"d_model": 10**15, "n_heads": 4, "n_kv_heads": 4, "head_dim": 64}},
                     "records": [{"part": "core", "shape": "s", "tp": 1, "phase": "prefill", "seq_len": 512,
                                  "tokens": 512, "median_ms": 1}]})


@case("calibrate", "not-json", "b.json")
def _(d: Path) -> list[str]:
    return bench(d, "{'world': 2}")


@case("calibrate", "not-utf8", "b.json", "byte 0x")
def _(d: Path) -> list[str]:
    return bench(d, b'{"world": 2, "device": "\xe9"}')


@case("calibrate", "duplicate-key", "b.json")
def _(d: Path) -> list[str]:
    return bench(d, json.dumps(a2a_bench())[:-1] + ', "world": 4}')


@case("calibrate", "deep-nesting", "b.json")
def _(d: Path) -> list[str]:
    return bench(d, '{"world": 2, "uniform": ' + "[" * 100000 + "]" * 100000 + "}")


@case("calibrate", "unknown-kind", "b.json")
def _(d: Path) -> list[str]:
    return bench(d, {"something": 1})


@case("calibrate", "second-file-bad", "c.json", "world")
def _(d: Path) -> list[str]:
    write(d / "b.json", json.dumps(a2a_bench()))
    write(d / "c.json", json.dumps(a2a_bench(world=3, skew=[])))
    return calibrate_cmd("b.json", "c.json")


# ================================================================================================ params YAML

def params_text() -> str:
    return textwrap.dedent("""\
        format: moesim.fitted_generator/1
        name: p
        num_layers: 2
        num_experts: 4
        top_k: 2
        fanout: 2
        layers:
        - {popularity: [0.25, 0.25, 0.25, 0.25], successors: [[1, 2], [2, 3], [3, 0], [0, 1]],
           successor_logits: [[1.0, 0.5], [1.0, 0.5], [1.0, 0.5], [1.0, 0.5]], coupling: 0.5}
        - {popularity: [0.25, 0.25, 0.25, 0.25]}
        """)


def params_cmd(d: Path, text: str) -> list[str]:
    write(d / "p.yaml", text)
    return ["trace", "generate", "p.yaml", "--gpus", "2", "--tokens-per-gpu", "8", "-o", "out/t.npz"]


def fitted_format() -> str:
    from moesim.traces.fitted_generator import FORMAT

    return FORMAT


@case("params", "nan-popularity", "p.yaml", "layers[0].popularity[1]")
def _(d: Path) -> list[str]:
    return params_cmd(d, params_text().replace("moesim.fitted_generator/1", fitted_format())
                      .replace("[0.25, 0.25, 0.25, 0.25], succ", "[0.25, .nan, 0.25, 0.25], succ"))


@case("params", "duplicate-key", "p.yaml", "top_k")
def _(d: Path) -> list[str]:
    return params_cmd(d, params_text().replace("moesim.fitted_generator/1", fitted_format()) + "top_k: 3\n")


@case("params", "experts-zero", "p.yaml", "num_experts")
def _(d: Path) -> list[str]:
    return params_cmd(d, params_text().replace("moesim.fitted_generator/1", fitted_format())
                      .replace("num_experts: 4", "num_experts: 0"))


@case("params", "alias-bomb", "p.yaml")
def _(d: Path) -> list[str]:
    lol = ["a0: &a0 [1,1,1,1,1,1,1,1,1,1]"] + [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]"
                                               for i in range(1, 8)]
    return params_cmd(d, "\n".join(lol) + "\n" + params_text())


@case("params", "not-utf8", "p.yaml", "byte 0x")
def _(d: Path) -> list[str]:
    return params_cmd(d, b"name: \xff\n")  # type: ignore[arg-type]


@case("params", "fitted-in-scenario-inf", "p.yaml", "coupling")
def _(d: Path) -> list[str]:
    write(d / "p.yaml", params_text().replace("moesim.fitted_generator/1", fitted_format())
          .replace("coupling: 0.5", "coupling: .inf"))
    write(d / "s.yaml", scenario(model__num_layers=2, model__num_experts=4, workload__synthetic__fitted="p.yaml"))
    return validate()


# ---- engine dumps (moesim trace import of SGLang, TensorRT-LLM, Megatron-LM, vLLM files)

def safetensors_bytes(header: dict[str, Any], data: bytes = b"", header_len: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if header_len is None else header_len) + text + data


def trtllm_dir(d: Path, rank0: bytes) -> list[str]:
    (d / "stats").mkdir()
    write(d / "stats" / "meta_info.json", json.dumps({"num_experts": 4, "num_experts_per_token": 2}))
    write(d / "stats" / "rank0.safetensors", rank0)
    return import_cmd("stats")


@case("engine-dump", "safetensors-offsets-beyond-file", "rank0.safetensors", "0_1", "truncated")
def _(d: Path) -> list[str]:
    return trtllm_dir(d, safetensors_bytes({"0_1": {"dtype": "I64", "shape": [4], "data_offsets": [0, 32]}}, b"\0" * 8))


@case("engine-dump", "safetensors-header-length-huge", "rank0.safetensors", "header")
def _(d: Path) -> list[str]:
    return trtllm_dir(d, safetensors_bytes({}, header_len=1 << 60))


@case("engine-dump", "safetensors-shape-lies", "rank0.safetensors", "0_1")
def _(d: Path) -> list[str]:
    return trtllm_dir(d, safetensors_bytes({"0_1": {"dtype": "I64", "shape": [1 << 40], "data_offsets": [0, 32]}},
                                           b"\0" * 32))


@case("engine-dump", "trtllm-key-not-iter-layer", "rank0.safetensors", "weights")
def _(d: Path) -> list[str]:
    return trtllm_dir(d, safetensors_bytes({"weights": {"dtype": "I64", "shape": [4], "data_offsets": [0, 32]}},
                                           b"\0" * 32))


# (without torch installed, both .pt cases are the one-line "needs torch" error naming the file)
@case("engine-dump", "pt-not-a-torch-file", "expert_distribution_recorder_1.pt")
def _(d: Path) -> list[str]:
    write(d / "expert_distribution_recorder_1.pt", zlib.compress(b"not a pickle" * 100))
    return import_cmd("expert_distribution_recorder_1.pt", "--format", "sglang-stat", "--top-k", "2")


@case("engine-dump", "pt-pickle-of-objects", "expert_distribution_recorder_1.pt")
def _(d: Path) -> list[str]:
    try:
        import torch
    except ImportError:
        write(d / "expert_distribution_recorder_1.pt", b"PK")
    else:
        torch.save({"logical_count": torch.zeros(1, 2, 4, dtype=torch.int32), "path": Path("x")},
                   d / "expert_distribution_recorder_1.pt")
    return import_cmd("expert_distribution_recorder_1.pt", "--top-k", "2")


@case("engine-dump", "megatron-line-not-json", "router_trace_rank0.jsonl", "line 2")
def _(d: Path) -> list[str]:
    rec = {"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 1, "rank": 0, "num_tokens": 1, "topk": 2,
           "top_indices": [[0, 1]]}
    write(d / "router_trace_rank0.jsonl", json.dumps(rec) + "\n{\n")
    return import_cmd("router_trace_rank0.jsonl")


@case("engine-dump", "megatron-ids-not-integers", "router_trace_rank0.jsonl", "line 1")
def _(d: Path) -> list[str]:
    rec = {"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 1, "rank": 0, "num_tokens": 1, "topk": 2,
           "top_indices": [[0, 1e400]]}
    write(d / "router_trace_rank0.jsonl", json.dumps(rec) + "\n")
    return import_cmd("router_trace_rank0.jsonl")


@case("engine-dump", "vllm-stats-huge-integer", "eplb.jsonl", "line 1")
def _(d: Path) -> list[str]:
    rec = {"record_type": "eplb_load_stats", "version": 1, "step": 0, "expert_load": [[10**30, 1]],
           "p2l_map": [[0, 1]]}
    write(d / "eplb.jsonl", json.dumps(rec) + "\n")
    return import_cmd("eplb.jsonl", "--top-k", "1")


@case("engine-dump", "routed-experts-bad-base64", "r.json", "routed_experts")
def _(d: Path) -> list[str]:
    write(d / "r.json", json.dumps([{"meta_info": {"routed_experts": "***"}}]))
    return import_cmd("r.json", "--layers", "2", "--top-k", "2")


# ------------------------------------------------------------------------------------------------ the runner

RUNNER = r'''
import contextlib, io, json, os, resource, sys, time, traceback, warnings

cases = json.load(open(sys.argv[1]))
out = open(sys.argv[2], "a")
from moesim.cli import main  # imports first: the limit applies to what the cases add
import moesim.study, moesim.traces.readers, moesim.calibration, numpy  # noqa: E401
page = os.sysconf("SC_PAGE_SIZE")
base_vm = int(open("/proc/self/statm").read().split()[0]) * page
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
resource.setrlimit(resource.RLIMIT_AS, (base_vm + int(sys.argv[3]), resource.RLIM_INFINITY))
home = os.getcwd()
for c in cases:
    os.chdir(c["dir"])
    before = sorted(str(p) for p in __import__("pathlib").Path(".").rglob("*"))
    env = {k: os.environ.get(k) for k in c["env"]}
    os.environ.update(c["env"])
    so, se = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    code, tb = None, ""
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se), warnings.catch_warnings():
        warnings.simplefilter("default")  # every warning is shown (and so counted as a stderr line)
        try:
            code = main(c["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
        except BaseException:
            tb = traceback.format_exc()
    seconds = time.perf_counter() - t0
    for k, v in env.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    after = sorted(str(p) for p in __import__("pathlib").Path(".").rglob("*"))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    os.chdir(home)
    out.write(json.dumps({"id": c["id"], "code": code, "stdout": so.getvalue(), "stderr": se.getvalue() + tb,
                          "seconds": seconds, "rss_over_base": rss - base_rss,
                          "created": sorted(set(after) - set(before)), "removed": sorted(set(before) - set(after))})
              + "\n")
    out.flush()
'''


def _run_all(root: Path) -> dict[str, dict[str, Any]]:
    """Build every case, then run them all in one subprocess (restarted after a case that kills it)."""
    specs = []
    for c in CASES:
        folder = root / c.id.replace("/", "__")
        folder.mkdir(parents=True)
        argv = c.build(folder)
        specs.append({"id": c.id, "dir": str(folder), "argv": argv, "env": c.env})
    results: dict[str, dict[str, Any]] = {}
    out = root / "results.jsonl"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.pop("MOESIM_MAX_MEMORY_GB", None)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    todo = specs
    while todo:
        listing = root / "cases.json"
        listing.write_text(json.dumps(todo))
        proc = subprocess.run([sys.executable, "-c", RUNNER, str(listing), str(out), str(EXTRA_BYTES)], env=env,
                              capture_output=True, text=True, timeout=600)
        for line in out.read_text().splitlines():
            r = json.loads(line)
            results[r["id"]] = r
        done = [s for s in todo if s["id"] in results]
        if len(done) == len(todo):
            break
        crashed = todo[len(done)]  # the runner died in this case: record it, go on with the rest
        results[crashed["id"]] = {"id": crashed["id"], "code": proc.returncode, "stdout": proc.stdout,
                                  "stderr": f"runner died (status {proc.returncode}): {proc.stderr[-2000:]}",
                                  "seconds": 0.0, "rss_over_base": 0, "created": [], "removed": []}
        todo = todo[len(done) + 1:]
    return results


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return _run_all(tmp_path_factory.mktemp("hostile"))


def test_corpus_size_and_kinds() -> None:
    kinds = {c.kind for c in CASES}
    assert len(CASES) >= 120 and len({c.id for c in CASES}) == len(CASES)
    assert {"scenario", "cluster", "flags", "placement", "trace-npz", "trace-npy", "trace-csv", "trace-jsonl",
            "calibrate", "params"} <= kinds


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_hostile_input_fails_as_one_line(c: Case, outcomes: dict[str, dict[str, Any]]) -> None:
    r = outcomes[c.id]
    err = r["stderr"]
    assert "Traceback" not in err, err
    assert r["code"] == 2, (r["code"], err, r["stdout"][-500:])
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    line = lines[0]
    assert line.startswith("moesim: error: "), line
    assert "ran out of memory" not in line, line  # the estimates must refuse it first, not the fallback
    for name in c.names:
        assert name in line, f"{name!r} not named in: {line}"
    assert not r["created"] and not r["removed"], (r["created"], r["removed"])
    assert r["seconds"] < SECONDS, r["seconds"]
    assert r["rss_over_base"] < EXTRA_BYTES, r["rss_over_base"]
