"""``workload.synthetic.fitted``: a generator fitted to real routing, as the model's own fit or carried over.

Two forms. A string names a params file (``moesim trace fit``) or a shipped fit: its layers, experts and top-k
must be the model's. A mapping, ``{params: NAME, expand_experts: N}``, carries a fit of a smaller model of the
family over to this one (:mod:`moesim.traces.fitted_expand`): each fitted expert split into ``N`` of equal share
(the model's experts must be the fit's times ``N``), layers mapped proportionally, identities shuffled per layer
by the workload's seed, top-k the model's. Both route group-limited when the model does (``expert_groups``,
``topk_groups``). Checked here, before anything runs; the generator is built by :func:`fitted_params`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Union

import numpy as np
from pydantic import ConfigDict, Discriminator, Field, Tag

from moesim.errors import InputError
from moesim.loaders import NoBoolNumbers
from moesim.traces.fitted_expand import expand_params
from moesim.traces.fitted_generator import FittedParams, load_params, resolve_params
from moesim.traces.model import MAX_EXPERTS, ModelSpec

FITTED_KEEPS = {"tokens_per_gpu", "batches", "profile_batches", "seed", "fitted"}


class FittedRouting(NoBoolNumbers):
    """A fit carried over to a bigger model of its family (``workload.synthetic.fitted`` as a mapping)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    params: str = Field(description="the fit: a params YAML (moesim trace fit) or a shipped name "
                        "(deepseek-v2-lite: DeepSeek-V2-Lite's real prefill routing)")
    expand_experts: int = Field(default=1, ge=1, le=MAX_EXPERTS, description="split each fitted expert into this "
                                "many of equal share (DeepSeek-V2-Lite's 64 -> DeepSeek-V3's 256: 4); the model's "
                                "num_experts must be the fit's times this")


def _form(value: Any) -> str:
    return "fitted-mapping" if isinstance(value, (dict, FittedRouting)) else "fitted-name"


# the field's type: a mapping is read as FittedRouting (its errors name its keys), anything else as a name
FittedField = Annotated[Union[Annotated[str, Tag("fitted-name")], Annotated[FittedRouting, Tag("fitted-mapping")]],
                        Discriminator(_form)]
FORM_TAGS = frozenset({"fitted-name", "fitted-mapping"})  # left out of the field names in errors


def _shape_error(have: FittedParams, model: ModelSpec, path: Path, expand: FittedRouting | None) -> str | None:
    """Why the fit cannot route the model, or None."""
    if expand is None:
        for key in ("num_layers", "num_experts", "top_k"):
            if getattr(have, key) != getattr(model, key):
                return (f"{path} has {key}={getattr(have, key)}, the scenario's model has {getattr(model, key)} (a "
                        "mapping {params: ..., expand_experts: N} carries a fit over to another shape)")
        return None
    want = have.num_experts * expand.expand_experts
    if want != model.num_experts:
        return (f"{path} has {have.num_experts} experts x expand_experts {expand.expand_experts} = {want}, the "
                f"scenario's model has {model.num_experts}")
    return None


def resolve_fitted(fitted: str | FittedRouting, model: ModelSpec, source: str, base_dir: Path,
                   fields_set: set[str]) -> str | FittedRouting:
    """Check ``workload.synthetic.fitted``: the file (or shipped name) loads, its shape fits the model, and no
    plain-generator field (in ``fields_set``) is set beside it. Returns it with the file's path resolved."""
    field = "workload.synthetic.fitted"
    others = sorted(fields_set - FITTED_KEEPS)
    if others:
        raise InputError(f"not used with 'fitted' (the fitted parameters set the routing shape); keep only "
                         f"{', '.join(sorted(FITTED_KEEPS))}", source=source, field=f"workload.synthetic.{others[0]}")
    expand = fitted if isinstance(fitted, FittedRouting) else None
    name = expand.params if expand is not None else str(fitted)
    where = field + (".params" if expand is not None else "")
    try:
        path = resolve_params(name, base_dir)
        params = load_params(path)
    except InputError as exc:
        raise InputError(str(exc), source=source, field=where) from None
    problem = _shape_error(params, model, path, expand)
    if problem:
        raise InputError(problem, source=source, field=field + (".expand_experts" if expand is not None else ""))
    resolved = str(path.resolve())
    return expand.model_copy(update={"params": resolved}) if expand is not None else resolved


def fitted_params(fitted: str | FittedRouting, model: ModelSpec, seed: int) -> FittedParams:
    """The generator of a resolved ``workload.synthetic.fitted`` for ``model``: the fit itself (its first layers
    when the model is cut short), or the fit carried over, its identities shuffled by ``seed``."""
    if isinstance(fitted, FittedRouting):
        return expand_params(load_params(fitted.params), num_layers=model.num_layers, num_experts=model.num_experts,
                             top_k=model.top_k, rng=np.random.default_rng(seed))
    params = load_params(fitted)
    if params.num_layers > model.num_layers:  # a model cut short (smoke tests): keep the fit's first layers
        params = params.first_layers(model.num_layers)
    return params


def model_groups(model: ModelSpec) -> tuple[int, int] | None:
    """The model's group-limited routing as (groups, topk_groups), or None when it has none."""
    if model.expert_groups > 1 and model.topk_groups is not None and model.topk_groups < model.expert_groups:
        return model.expert_groups, model.topk_groups
    return None
