"""``moesim export``: a placement file in a serving engine's own format (:mod:`moesim.placement.export`).

The engines index layers differently (docs/engine_formats.md); the model's dense layers come from ``--model``
(a preset, or a scenario whose ``model`` to use) or from ``--first-dense-layers``/``--moe-layer-step``/
``--num-decoder-layers``; with neither, every decoder layer is taken to be an MoE layer, and the command says so.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from moesim.cli.common import at_least_one, at_least_zero
from moesim.errors import InputError

if TYPE_CHECKING:
    from moesim.placement.export import LayerLayout
    from moesim.traces.model import ModelSpec


ENGINES = ("sglang", "trtllm", "vllm", "vllm-ascend", "moesim")  # moesim.placement.export.WRITERS' names (tested)


def model_from_flag(value: str) -> ModelSpec:
    """``--model``: a preset name, or a scenario YAML file whose model to use."""
    from moesim.traces.model import ModelSpec
    from moesim.traces.model_presets import model_preset, model_preset_names

    if value in model_preset_names():
        return ModelSpec.model_validate(model_preset(value).fields)
    if Path(value).suffix in (".yaml", ".yml") and Path(value).is_file():
        from moesim.study import load_scenario

        return load_scenario(value).model
    raise InputError(f"not a model preset ({', '.join(model_preset_names())}) nor a scenario .yaml file",
                     source=value, field="--model")


def layout_from_args(args: argparse.Namespace, num_moe_layers: int, model: ModelSpec | None) -> tuple[LayerLayout,
                                                                                                           str]:
    """The layer layout the flags give, and a line saying where it came from."""
    from moesim.placement.export import LayerLayout

    counts = (args.first_dense_layers, args.moe_layer_step, args.num_decoder_layers)
    at_least_zero(args.first_dense_layers, "--first-dense-layers", 10_000)
    at_least_one(args.moe_layer_step, "--moe-layer-step", 10_000)
    at_least_one(args.num_decoder_layers, "--num-decoder-layers", 10_000)
    if model is not None and any(c is not None for c in counts):
        raise InputError("give --model or the layer counts (--first-dense-layers, ...), not both", field="--model")
    if model is not None:
        if model.num_layers != num_moe_layers:
            raise InputError(f"model {model.name} has {model.num_layers} MoE layers, the placement {num_moe_layers}",
                             field="--model")
        lay = LayerLayout.from_model(model)
        return lay, (f"layers of {model.name}: {lay.num_decoder_layers} decoder layers, MoE from layer "
                     f"{lay.layer_ids[0]}")
    lay = LayerLayout.from_counts(num_moe_layers, first_dense_layers=args.first_dense_layers or 0,
                                  moe_layer_step=args.moe_layer_step or 1, num_decoder_layers=args.num_decoder_layers)
    if all(c is None for c in counts):
        return lay, (f"no --model given: all {num_moe_layers} decoder layers taken to be MoE layers (give --model or "
                     "--first-dense-layers for a model with dense layers, e.g. DeepSeek-V3's 3)")
    return lay, f"{lay.num_decoder_layers} decoder layers, MoE layers {lay.layer_ids[0]}..{lay.layer_ids[-1]}"


def add_layout_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model preset or scenario .yaml: where its dense layers are")
    p.add_argument("--first-dense-layers", type=int, help="dense decoder layers before the first MoE layer")
    p.add_argument("--moe-layer-step", type=int, help="every n-th decoder layer is MoE (default 1)")
    p.add_argument("--num-decoder-layers", type=int, help="decoder layers in all (default: what the counts give)")


def _cmd_export(args: argparse.Namespace) -> int:
    from moesim.placement.export import check_export_target, export_placement, get_writer
    from moesim.placement.format import load_placement

    writer = get_writer(args.to)
    check_export_target(args.output, args.to)
    model = model_from_flag(args.model) if args.model else None
    placement = load_placement(args.placement)
    layout, where = layout_from_args(args, placement.num_layers, model)
    if model is not None and model.num_experts != placement.num_experts:
        raise InputError(f"model {model.name} has {model.num_experts} experts, the placement "
                         f"{placement.num_experts}", source=args.placement, field="layers")
    done = export_placement(placement, args.to, args.output, layout, source=args.placement)
    print(done.summary(writer.title))
    if args.to in ("sglang", "trtllm"):
        print(f"  {where}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``moesim export``."""
    e = sub.add_parser("export", help="write a placement in a serving engine's format (SGLang, TensorRT-LLM, vLLM)")
    e.add_argument("placement", help="a moesim placement JSON (moesim place, or placements/ of a run)")
    e.add_argument("--to", required=True, metavar="|".join(ENGINES),
                   help="the engine whose format to write")
    e.add_argument("-o", "--output", required=True, help="the file to write")
    add_layout_flags(e)
    e.set_defaults(func=_cmd_export)
