"""The base of every config class: strict (unknown keys are errors), frozen, and with the bounds that keep numbers
to what can be meant. Imports pydantic only."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Upper bounds for counts, so a typo (`steps: 99999999999999999999999`) is an error with the allowed range rather
# than a run that never ends or an overflow deep inside torch.
MAX_STEPS = 10_000_000
MAX_SAMPLES = 1_000_000
MAX_SEQ_LEN = 1_048_576
MAX_BATCH = 65_536
MAX_WIDTH = 65_536  # group sizes, width multiples, LoRA ranks
MAX_LAYER = 4_096
MAX_SEED = 2**32 - 1
MAX_TOKENS = 2**40
