"""The ``rebalance`` section of a scenario: re-plan one placement every few batches from a window of recent load
(:mod:`moesim.study.rebalance`); checked with the rest of the scenario (:mod:`moesim.study.config`)."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from moesim.errors import InputError
from moesim.loaders import NoBoolNumbers

MAX_COUNT = 2**31 - 1  # tokens per GPU, batches, lengths: counts that numpy keeps in int32 arrays downstream


class _Strict(NoBoolNumbers):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class RebalanceConfig(_Strict):
    """Re-plan one placement every few batches from a window of recent load (moesim.study.rebalance)."""

    policy: str = Field(description="name of the scenario placement (made by a policy) to re-plan")
    every_batches: int = Field(ge=1, le=MAX_COUNT, description="re-plan before every N-th batch")
    window_batches: int = Field(ge=1, le=MAX_COUNT, description="plan on the loads of the last N batches")
    incremental: bool = Field(default=True, description="relabel the new plan's GPUs to keep most experts in place")
    migration: Literal["stall", "overlap"] = Field(
        default="stall", description="stall: serving waits for the weight transfers; overlap: batches run on the "
                                     "old plan, slowed by overlap_slowdown, until the transfers finish")
    overlap_slowdown: float = Field(default=0.1, description="fractional slowdown of batches during an overlapped "
                                    "migration (0.1: 10% slower), 0 to 1; only with migration: overlap")

    @field_validator("overlap_slowdown")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0 <= value <= 1:
            raise ValueError("a fraction of batch time from 0 to 1 (0.1 = 10% slower)")
        return value


def check_rebalance_batches(every: int, window: int, batches: int, source: str, *,
                            every_field: str = "rebalance.every_batches",
                            window_field: str = "rebalance.window_batches") -> None:
    """Raise InputError unless a run of ``batches`` batches has room for a rebalance every ``every`` batches
    and a window of ``window`` past batches (no rebalance can look back more than ``batches - 1``)."""
    if every >= batches:
        raise InputError(f"rebalancing every {every} batches needs more than {every} batches; the workload has "
                         f"{batches}", source=source, field=every_field)
    if window >= batches:
        raise InputError(f"a window of {window} batches is longer than the run: the workload has {batches} "
                         f"batches, so no rebalance can look back more than {batches - 1}", source=source,
                         field=window_field)
