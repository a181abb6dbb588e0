"""Serving and training engines' routing dumps: the table of formats, recognising a dump, and
:func:`import_dump`, which ``moesim trace import`` calls.

=====================  ======================================================  ===========================
format                 what it reads                                           result
=====================  ======================================================  ===========================
``sglang-stat``        SGLang recorder ``stat``: logical_count [passes, L, E]   counts (needs ``--top-k``)
``sglang-per-pass``    SGLang ``per_pass``: physical counts + map, per rank     counts (needs ``--top-k``)
``sglang-per-token``   SGLang ``per_token``: topk_ids_of_layer, physical ids    per-token trace
``trtllm``             TensorRT-LLM ``meta_info.json`` + ``rank{r}.safetensors``  counts; per-token from
                                                                                ``rank{r}_raw`` files
``megatron``           Megatron-LM ``router_trace_rank{r}.jsonl``               per-token trace
``vllm-stats``         vLLM load statistics JSONL (unmerged proposal #41141)    counts (needs ``--top-k``)
``routed-experts``     per-request routed experts (vLLM, SGLang), JSON/JSONL    per-token trace
=====================  ======================================================  ===========================

Each reader's module says what it accepts and what it ignores. Recognising looks at the file names and, for
``.pt`` and JSON files, at the content's keys (never executing anything: ``.pt`` files are opened with
``torch.load(weights_only=True)``). A folder is read as a whole (TensorRT-LLM's statistics folder, or the rank
files of SGLang or Megatron in it).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

from moesim.errors import InputError
from moesim.traces.count_trace import CountTrace
from moesim.traces.format import Trace
from moesim.traces.readers.dumps import Dump, DumpOptions, first_json_object, list_dir, load_torch
from moesim.traces.readers.megatron_reader import MEGATRON, read_megatron
from moesim.traces.readers.sglang_reader import PER_PASS, PER_TOKEN, STAT, read_per_pass, read_per_token, read_stat
from moesim.traces.readers.sglang_reader import sglang_kind
from moesim.traces.readers.trtllm_reader import TRTLLM, read_trtllm, trtllm_files
from moesim.traces.readers.vllm_reader import ROUTED, VLLM_STATS, looks_like, read_routed_experts, read_vllm_stats


@dataclass(frozen=True)
class EngineFormat:
    """One row: the format's name, what it reads (for help text), and its reader."""

    name: str
    what: str
    read: Callable[[list[Path], DumpOptions], Dump]


ENGINE_FORMATS: Mapping[str, EngineFormat] = MappingProxyType({f.name: f for f in (
    EngineFormat(STAT, "SGLang expert-distribution recorder, stat mode (.pt)", read_stat),
    EngineFormat(PER_PASS, "SGLang recorder, per_pass mode (.pt per rank)", read_per_pass),
    EngineFormat(PER_TOKEN, "SGLang recorder, per_token mode (.pt per rank)", read_per_token),
    EngineFormat(TRTLLM, "TensorRT-LLM expert statistics folder (meta_info.json, rank*.safetensors)", read_trtllm),
    EngineFormat(MEGATRON, "Megatron-LM --moe-routing-trace-path router_trace_rank*.jsonl", read_megatron),
    EngineFormat(VLLM_STATS, "vLLM EPLB load statistics JSONL (unmerged proposal #41141)", read_vllm_stats),
    EngineFormat(ROUTED, "per-request routed_experts (vLLM / SGLang) as JSON or JSONL", read_routed_experts),
)})


def _expand(paths: Sequence[Path]) -> list[Path]:
    """Folders of SGLang or Megatron rank files opened to their files (a TensorRT-LLM folder is kept)."""
    out: list[Path] = []
    for p in paths:
        if os.path.isdir(p) and not (p / "meta_info.json").exists():
            files = list_dir(p, "expert_distribution_recorder_*.pt") or list_dir(p, "router_trace_rank*.jsonl")
            if not files:
                raise InputError("a folder holding no engine dump (expert_distribution_recorder_*.pt, "
                                 "router_trace_rank*.jsonl, or meta_info.json with rank*.safetensors)", source=str(p))
            out.extend(files)
        else:
            out.append(p)
    return out


def _sniff_torch(path: Path) -> str | None:
    """The SGLang recorder mode of a ``torch.save`` zip file from the key names in its pickle's bytes (read as
    bytes, never unpickled; the tensors' data is not read), or None when that cannot tell."""
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pkl) != 1 or zf.getinfo(pkl[0]).file_size > 64 << 20:
                return None
            raw = zf.read(pkl[0])
    except (OSError, zipfile.BadZipFile, ValueError, KeyError):
        return None
    if b"logical_count" in raw:
        return STAT
    if b"last_physical_to_logical_map" in raw:
        return PER_TOKEN if b"topk_ids_of_layer" in raw else PER_PASS
    return None


def detect_engine(paths: Sequence[Path]) -> str | None:
    """The engine format of ``paths`` (the first one decides), or None when it is none of them (a plain
    moesim routing log: CSV, JSONL records, numpy)."""
    if not paths:
        return None
    p = Path(paths[0])
    if os.path.isdir(p):
        if (p / "meta_info.json").exists():
            return TRTLLM
        return detect_engine(_expand([p])) if (list_dir(p, "expert_distribution_recorder_*.pt")
                                               or list_dir(p, "router_trace_rank*.jsonl")) else None
    name = p.name.lower()
    if name == "meta_info.json" or name.endswith(".safetensors"):
        return TRTLLM
    if name.endswith(".pt"):
        kind = _sniff_torch(p) or sglang_kind(load_torch(p))
        if kind is None:
            raise InputError("a torch file that is not an SGLang expert-distribution dump", source=str(p))
        return kind
    if name.endswith((".json", ".jsonl", ".ndjson")):
        obj = first_json_object(p)
        return None if obj is None else looks_like(obj)
    return None


def dump_files(paths: Sequence[str | os.PathLike[str]], fmt: str) -> list[Path]:
    """The files a reader of ``fmt`` reads for ``paths`` (folders opened), one progress step each."""
    plist = [Path(p) for p in paths]
    if fmt == TRTLLM:
        _, counts, raw = trtllm_files(plist)
        return raw or counts
    return _expand(plist)


def read_dump(paths: Sequence[str | os.PathLike[str]], fmt: str | None = None,
              options: DumpOptions | None = None) -> Dump:
    """Read engine dumps (``fmt``, or recognised) into a per-token trace or a count trace, with notes."""
    plist = [Path(p) for p in paths]
    if not plist:
        raise InputError("no input files")
    if fmt is not None and fmt not in ENGINE_FORMATS:
        raise InputError(f"unknown engine format {fmt!r}; valid: {', '.join(ENGINE_FORMATS)}", field="format")
    fmt = fmt or detect_engine(plist)
    if fmt is None:
        raise InputError(f"not a dump of a known engine; give --format ({', '.join(ENGINE_FORMATS)})",
                         source=str(plist[0]))
    files = plist if fmt == TRTLLM else _expand(plist)
    opts = options or DumpOptions()
    dump = ENGINE_FORMATS[fmt].read(files, opts)
    m = dump.data.meta
    for flag, given, found in (("--top-k", opts.top_k, m.top_k), ("--num-experts", opts.num_experts, m.num_experts)):
        if given is not None and given != found:
            raise InputError(f"the dump says {found}, {flag} says {given}", source=str(plist[0]), field=flag)
    return dump


def import_dump(path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], format: str | None = None, *,
                num_experts: int | None = None, top_k: int | None = None, layers: int | None = None,
                model: str = "") -> Trace | CountTrace:
    """An engine dump (a file, a folder, or a list of rank files) as a per-token :class:`Trace` or a
    :class:`CountTrace` (count-only dumps); ``format`` as in :data:`ENGINE_FORMATS`, recognised when None."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    opts = DumpOptions(num_experts=num_experts, top_k=top_k, layers=layers, model=model)
    return read_dump(paths, format, opts).data
