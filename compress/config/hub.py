"""Recipe: `hub: {repo_id: my-org/llama2-7b-4bit-prune25, private: true, step: last}`."""

from __future__ import annotations

from pydantic import Field, field_validator

from compress.config.base import Strict
from compress.config.sources import HUB_ID, STEP_FOLDER_NAME


class HubPush(Strict):
    """Push one step folder of a run, with a model card, after the run."""

    repo_id: str = Field(description="the model repo to create or update, org/name")
    private: bool = Field(True, description="create the repo private (an existing repo keeps its visibility)")
    step: str = Field("last", description="the step folder to upload, e.g. 03-quantize; last = the final step")

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        if not HUB_ID.match(value):
            raise ValueError(f"'{value}' is not a repo id; use ORG/NAME, e.g. my-org/llama2-7b-4bit-prune25")
        return value

    @field_validator("step")
    @classmethod
    def _step(cls, value: str) -> str:
        if value != "last" and not STEP_FOLDER_NAME.match(value):
            raise ValueError(f"'{value}' is not a step folder; use one like 03-quantize, or last")
        return value
