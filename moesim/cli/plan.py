"""``moesim plan``: from an engine's routing dump to the placement decision and the map the engine loads.

Reads the dump, plans on its first windows and scores on the rest (:mod:`moesim.study.dump_plan`), prints the
comparison and the verdict, and writes the folder of :mod:`moesim.report.dump_plan`. The cluster is a preset or
a cluster YAML (``--set`` overrides its fields, e.g. ``nodes=4``); the model a preset or a scenario YAML, which
also gives the dense layers the engine's map must cover.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moesim.cli.common import at_least_one, at_least_zero, key_values, progress_bar
from moesim.cli.export import ENGINES, model_from_flag
from moesim.errors import InputError

if TYPE_CHECKING:
    from moesim.placement.export import LayerLayout
    from moesim.traces.model import ModelSpec
    from moesim.study.config import Scenario
    from moesim.traces.count_trace import CountTrace
    from moesim.traces.format import Trace


def load_dump(path: str, fmt: str | None, model: ModelSpec) -> Trace | CountTrace:
    """A routing dump: an engine's (:func:`moesim.traces.readers.engines.import_dump`, the model giving the
    expert count and top-k a dump may lack), or moesim's own trace or count ``.npz``."""
    from moesim.traces.count_trace import is_counts_file, load_counts
    from moesim.traces.format import load_trace
    from moesim.traces.readers.engines import ENGINE_FORMATS, detect_engine, import_dump

    if fmt not in (None, "moesim", *ENGINE_FORMATS):
        raise InputError(f"unknown dump format {fmt!r}; valid: moesim, {', '.join(ENGINE_FORMATS)}", field="--format")
    if fmt == "moesim" or (fmt is None and detect_engine([Path(path)]) is None):
        return load_counts(path) if is_counts_file(path) else load_trace(path)
    try:
        return import_dump(path, fmt, num_experts=model.num_experts, top_k=model.top_k, model=model.name)
    except InputError as exc:  # the counts it was given came from --model, not from trace import's flags
        detail, field = exc.detail, exc.field
        for flag in ("--num-experts", "--top-k"):
            detail = detail.replace(f"{flag} says", f"the model {model.name} (--model) has")
            field = "--model" if field == flag else field
        raise InputError(detail, source=exc.source, field=field) from None


def check_layers(dump: Trace | CountTrace, layout: LayerLayout, source: str) -> None:
    """The dump's MoE layers, where it names their decoder layers, must be the model's."""
    ids = getattr(dump, "layer_ids", None) or dump.meta.extra.get("layer_ids")
    if ids is not None and tuple(ids) != layout.layer_ids:
        raise InputError(f"the dump's MoE layers are decoder layers {list(ids)[:4]}..., the model's "
                         f"{list(layout.layer_ids)[:4]}...: give the model the dump came from", source=source,
                         field="--model")


def _scenario(args: argparse.Namespace) -> Scenario:
    """A study of the one cluster and the model the flags give (its workload is the dump's, set later)."""
    from moesim.study.config import parse_scenario

    model = model_from_flag(args.model)
    cluster: dict[str, Any] = {}
    if Path(args.cluster).suffix in (".yaml", ".yml"):
        cluster["file"] = str(Path(args.cluster).resolve())
    else:
        cluster["preset"] = args.cluster
    for key, value in key_values(args.set):
        cluster[key] = value
    engine: dict[str, Any] = {"progress": False}
    if args.a2a:
        engine["a2a"] = args.a2a
    data = {"name": "plan", "clusters": [cluster], "model": model.model_dump(),
            "workload": {"synthetic": {"tokens_per_gpu": args.tokens_per_gpu, "batches": 1}},
            "placements": ["contiguous"], "baseline": "contiguous", "engine": engine}
    return parse_scenario(data, "moesim plan (--cluster, --model, --set)", Path.cwd())


def _ints(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"must be integers separated by commas, got {text!r}", field=flag) from None


def _options(args: argparse.Namespace) -> Any:
    from moesim.study.dump_plan import PlanOptions

    at_least_one(args.tokens_per_gpu, "--tokens-per-gpu")
    at_least_zero(args.seed, "--seed")
    at_least_zero(args.current_redundant, "--current-redundant")
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    bad = [p for p in policies if p not in ("eplb", "greedy", "ilp")]
    if bad or not policies:
        raise InputError(f"must name some of eplb, greedy, ilp, got {args.policies!r}", field="--policies")
    if not 0 < args.ilp_time_limit <= 3600:
        raise InputError(f"must be from 0 to 3600 seconds, got {args.ilp_time_limit}", field="--ilp-time-limit")
    return PlanOptions(redundant=_ints(args.redundant, "--redundant"), policies=policies,
                       tokens_per_gpu=args.tokens_per_gpu, ilp_time_limit_s=args.ilp_time_limit, seed=args.seed,
                       current_redundant=args.current_redundant)


def _current(path: str, layout: LayerLayout, scenario: Scenario) -> Any:
    """``--current``: the user's map (an engine's file or a moesim placement), checked against model and cluster."""
    from moesim.placement.export.read import read_map
    from moesim.placement.validate import validate_placement

    m, ep = scenario.model, scenario.clusters[0].ep
    try:
        return validate_placement(read_map(path, layout, m.num_experts, ep), num_layers=m.num_layers,
                                  num_experts=m.num_experts, num_ranks=ep, source=path)
    except InputError as exc:
        raise exc.via(None, "--current") from None


def _cmd_plan(args: argparse.Namespace) -> int:
    from moesim.cli.export import layout_from_args
    from moesim.fileio import check_output_folder
    from moesim.placement.export import get_writer
    from moesim.report.dump_plan import PLAN_OUTPUTS, plan_report, write_plan_outputs
    from moesim.study.dump_plan import plan_from_dump, verdict

    writer = get_writer(args.engine, "--engine")
    check_output_folder(args.output, PLAN_OUTPUTS)
    t0 = time.perf_counter()
    scenario = _scenario(args)
    opts = _options(args)
    dump = load_dump(args.dump, args.format, scenario.model)
    args.first_dense_layers = args.moe_layer_step = args.num_decoder_layers = None
    layout, _ = layout_from_args(args, scenario.model.num_layers, scenario.model)
    check_layers(dump, layout, args.dump)
    if args.current:
        opts = replace(opts, current=_current(args.current, layout, scenario))
    cluster = scenario.clusters[0]
    with progress_bar(len(opts.policies) * 4 + 6, "planning", "step", quiet=args.quiet) as bar:
        def step(name: str) -> None:
            bar.set_postfix_str(name)
            bar.update(1)

        plan = plan_from_dump(dump, scenario, opts, step)
        v = verdict(plan, args.engine)
    where = f"{cluster.name} ({cluster.spec.num_gpus} GPUs, EP{cluster.ep})"
    report = plan_report(plan, v, args.engine, args.dump, where, scenario.model.name)
    path = write_plan_outputs(plan, v, args.engine, layout, report, args.output)
    print(report, end="")
    print(f"\nwrote {args.output}/ in {time.perf_counter() - t0:.1f} s: {path.name} ({writer.title}), plan.json, "
          "report.txt, placements/")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``moesim plan``."""
    p = sub.add_parser("plan", help="from a routing dump to a placement decision and the map your engine loads")
    p.add_argument("dump", help="the routing dump: an engine's (file or folder) or moesim's trace or counts .npz")
    p.add_argument("--format", help="the dump's format (default: recognised)")
    p.add_argument("--cluster", required=True, help="cluster preset or cluster YAML (moesim cluster list)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="cluster field, e.g. nodes=4")
    p.add_argument("--model", required=True, help="model preset or scenario YAML (its model)")
    p.add_argument("--engine", required=True, metavar="|".join(ENGINES), help="the engine whose map to write")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--current", help="your current map: an engine's file (SGLang, TensorRT-LLM, vLLM, vllm-ascend) or "
                   "a moesim placement; default: the engine's default map")
    p.add_argument("--current-redundant", type=int, help="redundant experts of the engine's default map")
    p.add_argument("--redundant", help="EPLB's redundant experts to try, e.g. 0,32,64 (default: 0-4 per rank)")
    p.add_argument("--policies", default="eplb,greedy,ilp", help="policies to plan with (default: all three)")
    p.add_argument("--tokens-per-gpu", type=int, default=1024, help="tokens per GPU of the simulated batch")
    p.add_argument("--ilp-time-limit", type=float, default=5.0, help="seconds the ILP may search (default 5)")
    p.add_argument("--a2a", choices=("direct", "hierarchical", "low_latency"), help="the all-to-all (engine.a2a)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_plan)
