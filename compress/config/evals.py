"""Recipe: `eval: {tasks: [wikitext2, rte, politeness], after: every_step, wikitext2: {...}, choice: {...}}`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from compress.config.base import MAX_BATCH, MAX_SAMPLES, MAX_SEQ_LEN, MAX_TOKENS, Strict

TASKS = ("wikitext2", "rte", "politeness")


class Perplexity(Strict):
    """Recipe: `eval: {wikitext2: {seq_len: 512, stride: 512, max_tokens: 16384}}`."""

    dataset: str = "wikitext2-test"
    seq_len: int = Field(512, ge=2, le=MAX_SEQ_LEN)
    stride: int | None = Field(None, ge=1, le=MAX_SEQ_LEN, description="defaults to seq_len (non-overlapping windows)")
    max_tokens: int | None = Field(None, ge=2, le=MAX_TOKENS, description="score only the first N tokens; None = all")
    batch_size: int = Field(4, ge=1, le=MAX_BATCH)

    @model_validator(mode="after")
    def _stride_fits(self):
        if self.stride is not None and self.stride > self.seq_len:
            raise ValueError(f"stride {self.stride} is larger than seq_len {self.seq_len}; tokens would be skipped")
        return self


class ChoiceEval(Strict):
    """Recipe: `eval: {choice: {num_fewshot: 0, limit: null, batch_size: 16}}`: how RTE and politeness are scored."""

    num_fewshot: int = Field(0, ge=0, le=64, description="examples from the train split put before each question")
    limit: int | None = Field(None, ge=1, le=MAX_SAMPLES, description="score only the first N rows of each task")
    batch_size: int = Field(16, ge=1, le=MAX_BATCH, description="sequences per forward pass")


class SpeedBench(Strict):
    """Recipe: `eval: {speed: {batches: [1], prompt: 128, new: 64, prefill: 512}}`: each step folder, loaded with the
    packed runtime (low-bit kernels), timed on the run's device (`compress bench`'s protocol)."""

    batches: list[int] = Field([1], min_length=1, description="batch sizes decoded")
    prompt: int = Field(128, ge=1, le=MAX_SEQ_LEN, description="prompt tokens before decoding")
    new: int = Field(64, ge=2, le=MAX_SEQ_LEN, description="tokens decoded greedily")
    prefill: int = Field(512, ge=1, le=MAX_SEQ_LEN, description="tokens of the one-sequence prefill timed")
    repeats: int = Field(3, ge=1, le=100, description="timed runs per figure (median), after a warm-up")
    compile: bool | None = Field(None, description="static KV cache and a compiled decode step; default: on a GPU, "
                                                   "not on a CPU")

    @model_validator(mode="after")
    def _batches_positive(self):
        if min(self.batches) < 1 or max(self.batches) > MAX_BATCH:
            raise ValueError(f"batches must be between 1 and {MAX_BATCH}; got {self.batches}")
        return self


class EvalConfig(Strict):
    tasks: list[Literal[TASKS]] = ["wikitext2"]  # type: ignore[valid-type]
    after: Literal["every_step", "last", "none"] = "every_step"
    wikitext2: Perplexity = Perplexity()
    choice: ChoiceEval = Field(ChoiceEval(), description="how the choice tasks (rte, politeness) are scored")
    speed: SpeedBench | None = Field(None, description="also time each step folder as it runs (decode tokens/s, "
                                                       "prefill, weights in memory); off by default")
