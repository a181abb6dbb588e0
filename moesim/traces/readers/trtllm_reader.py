"""TensorRT-LLM's expert statistics (``EXPERT_STATISTIC_PATH`` with ``EXPERT_STATISTIC_ITER_RANGE=a-b``), as
``tensorrt_llm/_torch/expert_statistic.py`` writes them and ``examples/wide_ep/ep_load_balancer/utils.py`` reads
them:

- ``meta_info.json`` (rank 0): ``{"num_experts": E, "num_experts_per_token": k}`` (forks add ``ep_size``,
  ``experts_per_rank``; ignored);
- ``rank{r}.safetensors``: one int tensor [E] per key ``"{iter}_{layer}"``, the bincount of that rank's tokens'
  selections at that iteration and layer -> summed over the ranks' files (the reader of TensorRT-LLM does the
  same), a count trace with one window per iteration; every token picks k experts, so a window's tokens are its
  picks over k;
- ``rank{r}_raw.safetensors``, where present: per key ``"{iter}_{layer}"`` the tensor ``token_selected_experts``
  [tokens, k] of that rank -> a per-token trace (one batch per iteration, each rank's tokens homed on it),
  preferred over the counts when the folder has them.

Layers: ``layer`` is the decoder-layer index of each MoE layer (3..60 for DeepSeek-R1); no rows for dense
layers, so the number of decoder layers is unknown here. Read with safetensors' numpy API (no torch). Every
(iteration, layer) must be present. Ignored: the ``rank{r}_numtokens.json`` files of forks.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from moesim.errors import InputError
from moesim.loaders import read_json
from moesim.traces.readers.dumps import (
    Dump, DumpOptions, TokenBlock, count_result, int_array, list_dir, load_safetensors, positive, rank_of, sources,
    token_result)

TRTLLM = "trtllm"
_KEY = re.compile(r"^(\d+)_(\d+)$")


def trtllm_files(paths: list[Path]) -> tuple[Path, list[Path], list[Path]]:
    """(meta_info.json, count files, raw files) of a folder, or of files given one by one."""
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        files = list_dir(folder, "rank*.safetensors")
    else:
        folder = paths[0].parent
        files = sorted((p for p in paths if p.suffix == ".safetensors"), key=lambda p: (rank_of(p), p.name))
        others = [p for p in paths if p.suffix != ".safetensors" and p.name != "meta_info.json"]
        if others:
            raise InputError("not a TensorRT-LLM statistics file (meta_info.json or rank{r}[_raw].safetensors)",
                             source=str(others[0]))
    meta = folder / "meta_info.json"
    given = [p for p in paths if p.name == "meta_info.json"]
    if given:
        meta = given[0]
    if not meta.is_file():
        raise InputError("meta_info.json not found beside the rank files (TensorRT-LLM's rank 0 writes it)",
                         source=str(meta))
    raw = [p for p in files if p.name.endswith("_raw.safetensors")]
    counts = [p for p in files if not p.name.endswith("_raw.safetensors")]
    if not counts and not raw:
        raise InputError("no rank{r}.safetensors files", source=str(folder))
    return meta, counts, raw


def _meta(path: Path) -> tuple[int, int]:
    src = str(path)
    data = read_json(path, src)
    if not isinstance(data, dict):
        raise InputError("must be a JSON object", source=src)
    return positive(data.get("num_experts"), src, "num_experts"), positive(data.get("num_experts_per_token"), src,
                                                                           "num_experts_per_token")


def _keys(tensors: dict[str, np.ndarray], src: str) -> dict[tuple[int, int], str]:
    out = {}
    for key in tensors:
        m = _KEY.match(key)
        if not m:
            raise InputError("key must be '{iter}_{layer}'", source=src, field=key)
        out[(int(m.group(1)), int(m.group(2)))] = key
    return out


def _grid(keys: set[tuple[int, int]], src: str) -> tuple[list[int], list[int]]:
    """Iterations and layers; every pair must be present."""
    iters = sorted({i for i, _ in keys})
    layers = sorted({lay for _, lay in keys})
    for it in iters:
        for lay in layers:
            if (it, lay) not in keys:
                raise InputError(f"no statistics for iteration {it}, layer {lay} (other iterations have them)",
                                 source=src, field=f"{it}_{lay}")
    return iters, layers


def read_trtllm(paths: list[Path], opts: DumpOptions) -> Dump:
    meta_path, count_files, raw_files = trtllm_files(paths)
    E, k = _meta(meta_path)
    if opts.num_experts and opts.num_experts != E:
        raise InputError(f"num_experts is {E}, --num-experts says {opts.num_experts}", source=str(meta_path),
                         field="num_experts")
    if raw_files:
        return _read_raw(raw_files, E, k, opts)
    return _read_counts(count_files, E, k, opts)


def _read_counts(files: list[Path], E: int, k: int, opts: DumpOptions) -> Dump:
    notes: list[str] = []
    total: dict[tuple[int, int], np.ndarray] = {}
    for path in files:
        opts.tick()
        src = str(path)
        tensors = load_safetensors(path)
        keys = _keys(tensors, src)
        _grid(set(keys), src)
        for ik, key in keys.items():
            if tensors[key].shape != (E,):
                raise InputError(f"shape {tensors[key].shape} must be [num_experts={E}] (meta_info.json)", source=src,
                                 field=key)
        order = list(keys)
        rows = int_array(np.stack([tensors[keys[ik]] for ik in order]), src, keys[order[0]], 2)
        if rows.size and int(rows.min()) < 0:
            bad = order[int(np.argmax((rows < 0).any(axis=1)))]
            raise InputError(f"count {int(rows.min())} must be >= 0", source=src, field=keys[bad])
        for ik, row in zip(order, rows):
            total[ik] = total[ik] + row if ik in total else row
    src = sources(files)
    iters, layers = _grid(set(total), src)
    loads = np.stack([np.stack([total[(it, lay)] for lay in layers]) for it in iters])
    picks = loads.sum(axis=2)  # [W, L]
    tokens = None
    if (picks == picks[:, :1]).all() and not (picks[:, 0] % k).any():
        tokens = picks[:, 0] // k
    else:
        notes.append("iterations' picks differ across layers or are not a multiple of top_k: tokens per iteration "
                     "left unknown")
    notes.append(f"{len(iters)} iterations ({iters[0]}-{iters[-1]}) summed over {len(files)} rank files")
    ct = count_result(loads, layers, num_decoder_layers=None, top_k=k, num_experts=E, window_tokens=tokens,
                      model=opts.model, source=f"TensorRT-LLM expert statistics ({src})", src=src, notes=notes,
                      extra={"iterations": iters})
    return Dump(ct, TRTLLM, notes)


def _read_raw(files: list[Path], E: int, k: int, opts: DumpOptions) -> Dump:
    notes: list[str] = []
    blocks: list[TokenBlock] = []
    layers_all: list[int] | None = None
    for path in files:
        opts.tick()
        src = str(path)
        rank = rank_of(path)
        tensors = load_safetensors(path)
        keys = _keys(tensors, src)
        iters, layers = _grid(set(keys), src)
        if layers_all is not None and layers != layers_all:
            raise InputError(f"layers {layers} differ from the first file's {layers_all}", source=src)
        layers_all = layers
        for it in iters:
            per_layer: list[np.ndarray] = []
            for lay in layers:
                key = keys[(it, lay)]
                ids = int_array(tensors[key], src, key, 2)
                if ids.shape[1] != k or (per_layer and ids.shape[0] != per_layer[0].shape[0]):
                    raise InputError(f"token_selected_experts of shape {ids.shape}: must be [tokens, top_k={k}] "
                                     "with the same tokens at every layer", source=src, field=key)
                if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= E):
                    bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
                    raise InputError(f"expert id {bad} out of range [0, {E})", source=src, field=key)
                per_layer.append(ids)
            blocks.append(TokenBlock(window=it, rank=rank, ids=np.stack(per_layer)))
    src = sources(files)
    assert layers_all is not None
    trace = token_result(blocks, layers_all, num_decoder_layers=None, num_experts=E, model=opts.model,
                         source=f"TensorRT-LLM expert statistics, raw token_selected_experts ({src})", src=src,
                         notes=notes)
    return Dump(trace, TRTLLM, notes)
