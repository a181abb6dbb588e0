"""``moesim model list | show``: the named model architectures (:mod:`moesim.traces.model_presets`) and one model's
every field, with the source of its figures.

``show`` takes a preset name and ``--set KEY=VALUE`` overrides (``--set num_layers=4``), as a scenario's
``model: {preset: NAME, KEY: VALUE}`` does; ``--yaml`` prints every field as a scenario's ``model`` section.
"""

from __future__ import annotations

import argparse
from typing import Any

from moesim.cli.common import key_values
from moesim.errors import InputError
from moesim.traces.model import ModelSpec
from moesim.traces.model_presets import ModelPreset, model_preset, model_preset_names

ATTENTION = {"mla": "MLA", "gqa": "GQA", "mha": "MHA", "projections": "projections only"}


def _billions(x: float) -> str:
    return f"{x / 1e12:.2f}T" if x >= 1e12 else f"{x / 1e9:.1f}B"


def _attention(m: ModelSpec) -> str:
    """``MLA 128 heads``, ``GQA 64/4 heads``, with the window where there is one."""
    kind = m.attention_kind
    heads = f"{m.num_heads}/{m.kv_heads}" if kind == "gqa" else f"{m.num_heads}"
    text = ATTENTION[kind] + (f" {heads} heads" if m.num_heads else "")
    if m.sliding_window:
        every = "" if m.sliding_window_every == 1 else f" on 1 layer in {m.sliding_window_every}"
        text += f", window {m.sliding_window}{every}"
    return text


def _layers(m: ModelSpec) -> str:
    return f"{m.num_layers} MoE" + (f" + {m.dense_layers} dense" if m.dense_layers else "")


def _experts(m: ModelSpec) -> str:
    return f"{m.num_experts}" + (f"+{m.shared_experts}" if m.shared_experts else "")


def _params(m: ModelSpec) -> str:
    counts = m.param_counts()
    return f"{_billions(counts['total'])} / {_billions(counts['active'])}"


def _list() -> None:
    head = ("preset", "layers", "experts", "top-k", "d_model", "attention", "params total / active")
    rows = []
    for name in model_preset_names():
        m = ModelSpec(**model_preset(name).fields)
        rows.append((name, _layers(m), _experts(m), str(m.top_k), str(m.d_model), _attention(m), _params(m)))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _model(name: str, overrides: list[str]) -> tuple[ModelPreset, ModelSpec]:
    from pydantic import ValidationError

    from moesim.study.config import _pydantic_error  # one formatter for every config error

    try:
        found = model_preset(name)
    except KeyError as exc:
        raise InputError(str(exc.args[0])) from None
    raw: dict[str, Any] = dict(found.fields)
    for key, value in key_values(overrides):
        if "." in key:
            raise InputError("a model field has no sub-keys", field=f"--set {key}")
        raw[key] = value
    try:
        return found, ModelSpec.model_validate(raw)
    except ValidationError as exc:
        raise _pydantic_error(exc, name, "") from None


def _describe(found: ModelPreset, m: ModelSpec) -> list[str]:
    """The lines of ``moesim model show``: the shape in words, parameters, source, what is not simulated, fields."""
    counts = m.param_counts()
    groups = f" within {m.topk_groups} of {m.expert_groups} groups" if m.expert_groups > 1 and m.topk_groups else ""
    layout = (f"{m.first_dense_layers} dense, then " if m.first_dense_layers else "") + (
        f"{m.num_layers} MoE" + (f" each after {m.moe_layer_step - 1} dense" if m.moe_layer_step > 1 else ""))
    lines = [
        f"{m.name}: {m.total_layers} layers ({layout}); {m.num_experts} routed experts"
        + (f" + {m.shared_experts} shared" if m.shared_experts else "") + f", top-{m.top_k}{groups}; "
        f"d_model {m.d_model}, expert d_ff {m.d_ff}; attention {_attention(m)}",
        f"  params    {_billions(counts['total'])} total, {_billions(counts['active'])} active per token ("
        + ", ".join(f"{k.replace('_', ' ')} {_billions(v)}" for k, v in counts.items()
                    if k not in ("total", "active") and v) + "; norms, biases and MTP layers not counted)",
        f"  source    {found.source}",
    ]
    notes = list(found.notes)
    if m.mtp_layers and not any("MTP" in n for n in notes):
        notes.append(f"the {m.mtp_layers} MTP layer(s) (num_nextn_predict_layers) run only with "
                     "workload.speculative")
    lines += [f"  not simulated: {n}" for n in notes]
    lines.append("  fields:")
    width = max(len(k) for k in ModelSpec.model_fields)
    lines += [f"    {k.ljust(width)}  {getattr(m, k)}" for k in ModelSpec.model_fields]
    return lines


def _cmd_model(args: argparse.Namespace) -> int:
    if args.action == "list":
        _list()
        return 0
    if not args.name:
        raise InputError("moesim model show needs a preset name (moesim model list shows them)")
    try:
        found, m = _model(args.name, args.set or [])
    except InputError as exc:
        raise exc.at(source=args.name) from None
    if args.yaml:  # every field, to start a scenario's model section from
        import yaml

        print(f"# moesim model show {args.name} --yaml: every field of the model; paste it as a scenario's model "
              f"section, or write model: {{preset: {args.name}, ...}} with the fields to change")
        print(yaml.safe_dump({"model": {k: getattr(m, k) for k in ModelSpec.model_fields}}, sort_keys=False), end="")
    else:
        print("\n".join(_describe(found, m)))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``moesim model`` on the top-level subparsers."""
    c = sub.add_parser("model", help="show model presets (real MoE architectures)")
    c.add_argument("action", choices=["show", "list"])
    c.add_argument("name", nargs="?", help="preset name")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. num_layers=4")
    c.add_argument("--yaml", action="store_true", help="show: print every field as a scenario's model section")
    c.set_defaults(func=_cmd_model)
