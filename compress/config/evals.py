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


class EvalConfig(Strict):
    tasks: list[Literal[TASKS]] = ["wikitext2"]  # type: ignore[valid-type]
    after: Literal["every_step", "last", "none"] = "every_step"
    wikitext2: Perplexity = Perplexity()
    choice: ChoiceEval = Field(ChoiceEval(), description="how the choice tasks (rte, politeness) are scored")
