"""Recipe: `- kv_cache: {dtype: fp8, scales: per_tensor | per_head}`: a quantized KV cache, as its own step."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from compress.config.base import Strict
from compress.config.data import CalibrationData

KV_SCALES = {
    "per_tensor": "one scale for the keys and one for the values of each layer (every vLLM attention backend)",
    "per_head": "one scale per KV head of each layer (vLLM's FlashAttention backend)",
}


class KVCache(Strict):
    """A quantized KV cache: `- kv_cache: {dtype: fp8, scales: per_tensor}`. Keys (after RoPE) and values are
    rounded onto the e4m3 grid as they are written to the cache, with static scales calibrated on the calibration set
    (the amax of each layer's keys and values / 448), saved as compressed-tensors' `kv_cache_scheme` and as each
    attention module's `k_scale` / `v_scale`, where vLLM reads them.

    Its own step rather than an option of a quantize step: the cache is independent of the weights' method (it goes
    alone on a float model, or after any weight step: RTN, GPTQ, AWQ, FP8, QAT), and its scales must be calibrated on
    the weights the model ends with. As a step it is calibrated on exactly those, its perplexity is the report's row
    against the step before it (the cache's own cost), and it must be the last step: a later step that changes the
    weights would leave the scales stale."""

    dtype: Literal["fp8"] = Field("fp8", description="fp8: float8 e4m3 (max 448), half a 16-bit cache's bytes")
    scales: Literal["per_tensor", "per_head"] = Field(
        "per_tensor", description="; ".join(f"{k}: {v}" for k, v in KV_SCALES.items()))
    centre_keys: bool = Field(True, description=(
        "where k_proj has a bias (Qwen2): move the keys' constant offset on the RoPE pairs that barely turn out of "
        "the bias before calibrating, so e4m3 rounds what varies, not the offset; attention is unchanged (a constant "
        "per query drops out of its softmax)"))
    calibration: CalibrationData | None = Field(None, description="default: the recipe's data.calibration")

    def describe(self) -> str:
        centred = ", keys centred where k_proj has a bias" if self.centre_keys else ""
        return f"KV cache {self.dtype} e4m3, {self.scales.replace('_', '-')} scales{centred}"
