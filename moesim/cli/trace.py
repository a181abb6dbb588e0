"""``moesim trace import | stats | fit | generate | capture``: routing traces in, statistics and fitted
generators out.

Every subcommand checks its output path and validates its input fully before the work starts, writes its
outputs atomically (a file, or ``--plots``' folder as a whole, :mod:`moesim.fileio`), replaces only files it
wrote, and reports bad input as one line naming the file and the field or line (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import IO, Any

from moesim.cli.common import at_least_one, at_least_zero, progress_bar
from moesim.errors import InputError
from moesim.fileio import atomic_write, check_output_file, check_output_folder, output_folder

TRACE_FILE = "a trace moesim wrote"


def _check_trace_output(path: str) -> None:
    from moesim.traces.format import is_trace_file

    check_output_file(path, owned=is_trace_file, what=TRACE_FILE)


def _n(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else many or one + 's'}"


def _owned_import(path: Path) -> bool:
    from moesim.traces.count_trace import is_counts_file
    from moesim.traces.format import is_trace_file

    return is_trace_file(path) or is_counts_file(path)


def _engine_format(args: argparse.Namespace) -> str | None:
    """The engine dump format of the inputs (``--format`` or recognised), None for a plain routing log."""
    from moesim.traces.readers.engines import ENGINE_FORMATS, detect_engine

    if args.format in ENGINE_FORMATS:
        return str(args.format)
    if args.format is not None:
        return None
    return detect_engine([Path(p) for p in args.inputs])


def _cmd_import(args: argparse.Namespace) -> int:
    from moesim.traces.format import save_trace
    from moesim.traces.readers import import_trace

    check_output_file(args.output, owned=_owned_import, what="a trace or counts file moesim wrote")
    if args.layers is not None:
        at_least_one(args.layers, "--layers")
    fmt = _engine_format(args)
    if fmt is not None:
        return _import_engine_dump(args, fmt)
    if args.layers is not None:
        raise InputError("applies to base64 routed experts only (--format routed-experts)", field="--layers")
    t0 = time.perf_counter()
    try:
        res = import_trace(args.inputs, fmt=args.format, num_experts=args.num_experts, top_k=args.top_k,
                           num_gpus=args.gpus, tokens_per_gpu=args.tokens_per_gpu, assign=args.assign,
                           skip_bad=args.skip_bad, allow_missing=args.allow_missing, axes=args.axes, model=args.model)
    except InputError as exc:  # a flag's problem (--gpus, sizes) without a file of its own: name the inputs
        raise exc.at(source=", ".join(args.inputs)) from None
    save_trace(res.trace, args.output, compress=not args.stored)
    m, tr = res.trace.meta, res.trace
    batches = int(tr.batch.max()) + 1 if tr.batch is not None and tr.num_tokens else None
    print(f"wrote {args.output}: {tr.num_tokens} tokens x {m.num_layers} layers x top-{m.top_k} of {m.num_experts} "
          f"experts from {_n(res.records, 'record')}, {_n(res.requests, 'request')}"
          + (f", {_n(batches, 'batch', 'batches')} on {args.gpus} GPUs ({args.assign})" if batches else "")
          + f" in {time.perf_counter() - t0:.1f} s")
    print(f"  skipped {_n(res.skipped, 'malformed record')}; padded {_n(res.padded, 'record')} with fewer than top_k "
          f"ids (-1 = no expert); filled {_n(res.missing, 'missing (token, layer) record')} with -1")
    for note in res.notes:
        print(f"  note: {note}")
    return 0


def _layer_text(ids: list[int] | tuple[int, ...] | None, decoder: int | None) -> str:
    if ids is None:
        return "MoE-layer index 0.." + "L-1"
    shown = ", ".join(map(str, ids[:6])) + (f", ... {ids[-1]}" if len(ids) > 6 else "")
    return f"decoder-layer ids {shown}" + (f" of {decoder} decoder layers" if decoder else "")


def _import_engine_dump(args: argparse.Namespace, fmt: str) -> int:
    """``moesim trace import`` of an engine dump: a per-token trace or a count trace, and what it supports."""
    from moesim.traces.count_trace import CountTrace, save_counts
    from moesim.traces.format import save_trace
    from moesim.traces.readers.dumps import DumpOptions
    from moesim.traces.readers.engines import dump_files, read_dump

    for flag, value in (("--gpus", args.gpus), ("--tokens-per-gpu", args.tokens_per_gpu),
                        ("--skip-bad", args.skip_bad), ("--allow-missing", args.allow_missing),
                        ("--axes", args.axes != "tlk")):
        if value:
            raise InputError(f"does not apply to engine dumps ({fmt}: the engine's own batches are kept)",
                             field=flag)
    for flag, value in (("--num-experts", args.num_experts), ("--top-k", args.top_k)):
        if value is not None:
            at_least_one(value, flag)
    t0 = time.perf_counter()
    with progress_bar(len(dump_files(args.inputs, fmt)), f"reading {fmt}", "file", quiet=args.quiet) as bar:
        opts = DumpOptions(num_experts=args.num_experts, top_k=args.top_k, layers=args.layers, model=args.model,
                           progress=bar.update)
        dump = read_dump(args.inputs, fmt, opts)
    data = dump.data
    took = time.perf_counter() - t0
    if isinstance(data, CountTrace):
        save_counts(args.output, data)
        m = data.meta
        print(f"wrote {args.output}: counts ({fmt}) of {_n(data.num_windows, 'window')} x {m.num_layers} MoE layers x "
              f"{m.num_experts} experts, top-{m.top_k}, {int(data.loads.sum())} picks "
              f"({_layer_text(data.layer_ids, data.num_decoder_layers)}) in {took:.1f} s")
        print("  supports: EPLB, greedy and ILP load terms, imbalance and drift per window; per-token traffic and "
              "cross-layer affinity only through the labelled synthetic expansion (expand_counts)")
    else:
        save_trace(data, args.output, compress=not args.stored)
        m = data.meta
        batches = int(data.batch.max()) + 1 if data.batch is not None else None
        ids = m.extra.get("layer_ids")
        print(f"wrote {args.output}: per-token trace ({fmt}) of {data.num_tokens} tokens x {m.num_layers} MoE layers x "
              f"top-{m.top_k} of {m.num_experts} experts"
              + (f", {_n(batches, 'batch', 'batches')}" if batches else "")
              + f" ({_layer_text(ids, m.extra.get('num_decoder_layers'))}) in {took:.1f} s")
        print("  supports: everything a routing trace does (placements, simulation, trace stats)")
    for note in dump.notes:
        print(f"  note: {note}")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from moesim.traces.format import load_trace
    from moesim.traces.stats import STATS_PASSES, STATS_PLOTS, format_stats, is_stats_json, plot_stats, trace_stats

    json_out = (check_output_file(args.json, owned=is_stats_json, what="a summary moesim trace stats wrote")
                if args.json else None)
    if args.plots:
        plots_out = check_output_folder(args.plots, STATS_PLOTS)
        if json_out is not None and plots_out in json_out.parents:
            raise InputError(f"lies inside the --plots folder {args.plots}; give it a place of its own",
                             source=args.json)
    if _is_counts(args.trace):
        return _count_stats(args)
    trace = load_trace(args.trace, mmap=True)
    at_least_one(args.top, "--top")
    at_least_one(args.window, "--window")
    if args.layer is not None and not 0 <= args.layer < trace.meta.num_layers:
        raise InputError(f"layer {args.layer} out of range [0, {trace.meta.num_layers})", field="--layer")
    try:
        with progress_bar(STATS_PASSES * trace.num_tokens, f"counting {Path(args.trace).name}", "token",
                          quiet=args.quiet, scale=True) as bar:
            st = trace_stats(trace, top_m=args.top, window=args.window, progress=bar.update)
    except InputError as exc:  # too large to count (moesim.traces.stats.stats_cost)
        raise exc.at(source=str(args.trace)) from None
    print(format_stats(st, name=str(args.trace), layers=None if args.all_layers else 12))
    text = json.dumps(st.summary(), indent=1)

    def write(fh: IO[Any]) -> None:
        fh.write(text + "\n")

    if args.plots:  # the plots are swapped in after the summary is written: both, or (on failure) neither new
        with output_folder(args.plots, STATS_PLOTS) as tmp:
            names = [p.name for p in plot_stats(st, tmp, layer=args.layer, name=Path(args.trace).name)]
            if args.json:
                atomic_write(args.json, write)
    elif args.json:
        atomic_write(args.json, write)
    if args.json:
        print(f"wrote {args.json}")
    if args.plots:
        print(f"wrote {', '.join(str(Path(args.plots) / n) for n in names)}")
    return 0


def _is_counts(path: str) -> bool:
    from moesim.traces.count_trace import is_counts_file

    return Path(path).is_file() and is_counts_file(path)


def _count_stats(args: argparse.Namespace) -> int:
    """``moesim trace stats`` of a count trace: loads and drift; what needs per-token paths is refused."""
    from moesim.traces.count_stats import count_stats, format_count_stats
    from moesim.traces.count_trace import load_counts, refuse_counts

    if args.plots:
        raise refuse_counts("the heatmaps of --plots (co-activation, transitions)", source=args.trace)
    if args.window is not None:
        raise InputError("does not apply to a count trace: its windows are the dump's", field="--window")
    at_least_one(args.top, "--top")
    ct = load_counts(args.trace)
    if args.layer is not None and not 0 <= args.layer < ct.meta.num_layers:
        raise InputError(f"layer {args.layer} out of range [0, {ct.meta.num_layers})", field="--layer")
    summary = count_stats(ct, top_m=args.top)
    print(format_count_stats(summary, name=str(args.trace), layers=None if args.all_layers else 12))
    if args.json:
        text = json.dumps(summary, indent=1)
        atomic_write(args.json, lambda fh: fh.write(text + "\n"))
        print(f"wrote {args.json}")
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    from moesim.traces.fitted_generator import fitted_vs_real, save_params
    from moesim.traces.format import load_trace
    from moesim.traces.fitted_generator import is_params_file
    from moesim.traces.generator_fit import fit_steps, fit_trace

    check_output_file(args.output, owned=is_params_file, what="generator parameters moesim wrote")
    for flag, value in (("--fanout", args.fanout), ("--calibration-tokens", args.calibration_tokens),
                        ("--window", args.window), ("--check-tokens", args.check_tokens)):
        at_least_one(value, flag)
    at_least_zero(args.rounds, "--rounds")
    at_least_zero(args.seed, "--seed")
    trace = load_trace(args.trace, mmap=True)
    t0 = time.perf_counter()
    with progress_bar(fit_steps(args.rounds) + 1, f"fitting {Path(args.trace).name}", "step", quiet=args.quiet) as bar:
        def step(n: int) -> None:  # the statistics, each calibration sample, then the comparison
            nxt = "calibrating" if bar.n + n < fit_steps(args.rounds) else "comparing"
            bar.set_postfix_str(nxt, refresh=False)  # shown with the count, once the bar shows
            bar.update(n)

        try:
            params = fit_trace(trace, fanout=args.fanout, calibration_tokens=args.calibration_tokens,
                               rounds=args.rounds, seed=args.seed, name=args.name or Path(args.trace).stem,
                               window=args.window, progress=step)
        except InputError as exc:  # too large to fit (the cost estimates)
            raise exc.at(source=str(args.trace)) from None
        fit_s = time.perf_counter() - t0
        try:  # before writing anything
            rows = fitted_vs_real(params, trace, tokens=args.check_tokens, seed=args.seed + 1)
        except InputError as exc:
            raise exc.at(source=str(args.trace), field_prefix=None if exc.field else "--check-tokens") from None
        bar.update(1)
    save_params(params, args.output, header=f"moesim trace fit {args.trace} (fanout {args.fanout}, seed {args.seed})")
    print(f"wrote {args.output}: {params.num_layers} layers x {params.num_experts} experts, top-{params.top_k}, "
          f"{params.fanout} successors per expert, fitted in {fit_s:.1f} s")
    print(f"{'statistic':36s} {'real':>8s} {'fitted':>8s}")
    for name, real, fit in rows:
        print(f"{name:36s} {real:8.3f} {fit:8.3f}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from moesim.traces.fitted_generator import load_params, write_fitted_trace

    _check_trace_output(args.output)
    for flag, value in (("--gpus", args.gpus), ("--tokens-per-gpu", args.tokens_per_gpu), ("--batches", args.batches)):
        at_least_one(value, flag)
    at_least_zero(args.seed, "--seed")
    params = load_params(args.params)
    t0 = time.perf_counter()
    try:
        with progress_bar(args.batches * args.gpus * args.tokens_per_gpu, f"generating {Path(args.output).name}",
                          "token", quiet=args.quiet, scale=True) as bar:
            path = write_fitted_trace(params, args.output, num_gpus=args.gpus, tokens_per_gpu=args.tokens_per_gpu,
                                      batches=args.batches, seed=args.seed, weights=args.weights, progress=bar.update)
    except InputError as exc:  # too large to generate (moesim.traces.fitted_generator.fitted_cost)
        raise exc.at(source=str(args.params)) from None
    print(f"wrote {path}: {args.batches * args.gpus * args.tokens_per_gpu} tokens x {params.num_layers} layers x "
          f"top-{params.top_k} (stored uncompressed: memory-mapped on load) in {time.perf_counter() - t0:.1f} s")
    return 0


def _cmd_capture(args: argparse.Namespace) -> int:
    from moesim.traces.capture import capture_trace, read_prompts
    from moesim.traces.format import save_trace

    _check_trace_output(args.output)
    for flag, value in (("--max-tokens", args.max_tokens), ("--gpus", args.gpus),
                        ("--tokens-per-gpu", args.tokens_per_gpu)):
        at_least_one(value, flag)

    prompts = read_prompts(args.prompts)
    trace = capture_trace(args.model, prompts, max_tokens=args.max_tokens, device=args.device, dtype=args.dtype,
                          num_gpus=args.gpus, tokens_per_gpu=args.tokens_per_gpu, assign=args.assign,
                          trust_remote_code=args.trust_remote_code, download=args.download)
    save_trace(trace, args.output)
    m = trace.meta
    print(f"wrote {args.output}: {trace.num_tokens} tokens from {len(prompts)} prompts x {m.num_layers} MoE layers x "
          f"top-{m.top_k} of {m.num_experts} experts, with gate weights ({m.model})")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``moesim trace ...`` on the top-level subparsers."""
    t = sub.add_parser("trace", help="import, capture, inspect and fit routing traces")
    ts = t.add_subparsers(dest="trace_command", required=True)
    _add_import_parser(ts)
    _add_stats_parser(ts)
    _add_fit_parser(ts)
    _add_generate_parser(ts)
    _add_capture_parser(ts)


def _add_import_parser(ts: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from moesim.traces.readers import READERS
    from moesim.traces.readers.engines import ENGINE_FORMATS

    engines = "; ".join(f"{f.name}: {f.what}" for f in ENGINE_FORMATS.values())
    i = ts.add_parser("import", help="convert routing logs or engine dumps (SGLang, TensorRT-LLM, Megatron-LM, "
                                     "vLLM) to a .npz trace, or to counts when the dump holds only counts")
    i.add_argument("inputs", nargs="+", help="log files (.csv[.gz], .jsonl[.gz], .npy, .npz), or an engine's dump "
                                             "files or folder")
    i.add_argument("-o", "--output", required=True, help=".npz trace (or counts) to write")
    i.add_argument("--format", choices=list(READERS) + list(ENGINE_FORMATS),
                   help=f"default: from the file names and contents. Engine dumps: {engines}")
    i.add_argument("--num-experts", type=int, help="routed experts per layer (default: highest id + 1)")
    i.add_argument("--top-k", type=int, help="picks per token (default: the most any record has; required for "
                                             "count dumps that do not record it)")
    i.add_argument("--layers", type=int, help="layers of base64 routed experts (routed-experts)")
    i.add_argument("--gpus", type=int, help="pack requests onto this many GPUs (home ranks) and batches")
    i.add_argument("--tokens-per-gpu", type=int, help="per-GPU token budget of a batch (default: longest request)")
    i.add_argument("--assign", choices=["least_loaded", "round_robin"], default="least_loaded",
                   help="how requests are given home GPUs")
    i.add_argument("--skip-bad", action="store_true", help="skip malformed records (the count is printed)")
    i.add_argument("--allow-missing", action="store_true", help="fill missing (token, layer) records with -1")
    i.add_argument("--axes", default="tlk", help="axis order of raw numpy arrays (t=token, l=layer, k=choice)")
    i.add_argument("--model", default="", help="model name stored in the trace")
    i.add_argument("--stored", action="store_true", help="write uncompressed (memory-mappable)")
    i.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    i.set_defaults(func=_cmd_import)


def _add_stats_parser(ts: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = ts.add_parser("stats", help="load skew, co-activation, transitions, drift; heatmaps with --plots (a count "
                                    "trace: load skew and drift only)")
    s.add_argument("trace", help="a trace, or counts that 'moesim trace import' wrote from an engine dump")
    s.add_argument("--top", type=int, default=8, help="m of the top-m successor / partner shares (8)")
    s.add_argument("--window", type=int, help="drift window in tokens (default: the trace's batches, or 16 windows)")
    s.add_argument("--plots", help="folder for load.png, transitions.png, coactivation.png, drift.png")
    s.add_argument("--layer", type=int, help="layer of the per-layer heatmaps (default: the middle one)")
    s.add_argument("--json", help="write the summary as JSON")
    s.add_argument("--all-layers", action="store_true", help="print every layer (default: the first 12)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_stats)


def _add_fit_parser(ts: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    f = ts.add_parser("fit", help="fit generator parameters (YAML) to a real trace")
    f.add_argument("trace")
    f.add_argument("-o", "--output", required=True, help="parameters YAML to write")
    f.add_argument("--fanout", type=int, default=16, help="successors kept per expert (16)")
    f.add_argument("--rounds", type=int, default=24, help="calibration rounds against simulated samples (24)")
    f.add_argument("--calibration-tokens", type=int,
                   help="tokens per calibration sample (default: as many as the trace)")
    f.add_argument("--window", type=int, help="drift window in tokens (default: the trace's batches, or 16 windows)")
    f.add_argument("--check-tokens", type=int, default=32768, help="tokens generated for the printed comparison")
    f.add_argument("--name", help="name stored in the parameters")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=_cmd_fit)


def _add_generate_parser(ts: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    g = ts.add_parser("generate", help="generate a trace from fitted parameters (memory-mappable .npz)")
    g.add_argument("params", help="parameters YAML from 'moesim trace fit' (or a shipped name)")
    g.add_argument("-o", "--output", required=True)
    g.add_argument("--gpus", type=int, default=8)
    g.add_argument("--tokens-per-gpu", type=int, default=4096)
    g.add_argument("--batches", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--weights", action="store_true", help="also store gate weights")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=_cmd_generate)


def _add_capture_parser(ts: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    c = ts.add_parser("capture", help="run a Hugging Face MoE model over prompts and record its routing "
                                      "(needs pip install -e '.[capture]')")
    c.add_argument("model", help="local model folder, or a hub id already in the Hugging Face cache")
    c.add_argument("prompts", help="text file (one prompt per line) or JSONL with 'text' or 'input_ids'")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--max-tokens", type=int, default=2048, help="truncate each prompt to this many tokens")
    c.add_argument("--device", default="cpu")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--gpus", type=int, help="pack prompts onto this many GPUs (home ranks) and batches")
    c.add_argument("--tokens-per-gpu", type=int)
    c.add_argument("--assign", choices=["least_loaded", "round_robin"], default="least_loaded")
    c.add_argument("--trust-remote-code", action="store_true")
    c.add_argument("--download", action="store_true",
                   help="let transformers download the model and tokenizer (default: local files only)")
    c.set_defaults(func=_cmd_capture)
