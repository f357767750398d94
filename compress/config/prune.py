"""Recipe: `prune: {method: taylor, importance: element1, ratio: 0.25, layers: [4, 30]}`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from compress.config.base import MAX_LAYER, MAX_WIDTH, Strict
from compress.config.data import CalibrationData

IMPORTANCE = ("element1", "element2", "vector", "mix", "l1", "l2", "random")
NEEDS_GRADIENT = ("element1", "element2", "vector", "mix")
NEEDS_FISHER = ("element2", "mix")


class TaylorPrune(Strict):
    """Structured pruning as LLM-Pruner (Ma et al. 2023): attention heads (or KV groups) and MLP channels scored by
    Taylor importance, the least important removed for real."""

    method: Literal["taylor"] = "taylor"
    importance: Literal[IMPORTANCE] = Field(  # type: ignore[valid-type]
        "element1", description="element1 | element2 | vector | mix (Taylor, LLM-Pruner); l1 | l2 | random baselines")
    ratio: float = Field(0.25, gt=0, lt=1, description="fraction of each pruned layer's heads and channels removed")
    layers: tuple[int, int] | None = Field(None, description="[start, end) decoder layers to prune; default all")
    targets: tuple[Literal["attention", "mlp"], ...] = Field(("attention", "mlp"), min_length=1)
    heads: Literal["auto", "query", "kv_groups"] = Field(
        "auto", description="query: the same number of query heads removed from every KV group; kv_groups: whole "
                            "KV groups with their query heads; auto: query under GQA, kv_groups otherwise")
    scope: Literal["layer", "global"] = Field(
        "layer", description="layer: every pruned layer loses `ratio`; global: one ranking across the pruned layers")
    multiple: int = Field(64, ge=1, le=MAX_WIDTH, description="kept widths are rounded to multiples of this")
    uniform: bool = Field(False, description="prune every layer to the same widths: a stock transformers config")
    experts: float = Field(0.0, ge=0, lt=1, description="MoE models: fraction of each layer's experts removed, the "
                                                         "least salient by REAP on the calibration samples")
    calibration: CalibrationData = CalibrationData(samples=10, seq_len=128)

    @model_validator(mode="after")
    def _consistent(self):
        if self.layers is not None and not 0 <= self.layers[0] < self.layers[1] <= MAX_LAYER:
            raise ValueError(f"layers [{self.layers[0]}, {self.layers[1]}] is not a range [start, end) with "
                             f"0 <= start < end <= {MAX_LAYER}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets {list(self.targets)} lists a target twice")
        if self.uniform and self.scope == "global":
            raise ValueError("uniform: true gives every layer the same widths, scope: global ranks across layers "
                             "and gives them different widths; choose one")
        return self

    def describe(self) -> str:
        where = f"layers [{self.layers[0]}, {self.layers[1]})" if self.layers else "all layers"
        experts = f", {self.experts:.0%} of the experts by REAP" if self.experts else ""
        return (f"prune {'/'.join(self.targets)} {self.ratio:.0%} by {self.importance} importance{experts}, {where}, "
                f"{self.scope} ranking, widths multiple of {self.multiple}")
