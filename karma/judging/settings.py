"""Settings of the stage judge."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from karma.core.settings import Dtype, Section, setting

JudgeKind = Literal["reward", "llm"]
JudgeMethod = Literal["weighted", "generate"]
Aspect = Literal["helpfulness", "honesty", "instruction_following", "truthfulness"]
ASPECTS: tuple[Aspect, ...] = ("helpfulness", "honesty", "instruction_following", "truthfulness")


class JudgeConfig(Section):
    """Stage ``judge``: every pool completion scored; UltraFeedback records for preferences."""

    kind: JudgeKind = setting(
        "llm",
        "reward (AutoModelForSequenceClassification) | llm "
        "(UltraFeedback's four aspects, ratings 1-5)",
    )
    model: str = setting(
        "models/base", "judge: hub id, local directory or served model name", min_length=1
    )
    revision: str | None = setting(None, "hub revision of the judge")
    trust_remote_code: bool = setting(False, "let a hub judge run its own code (ArmoRM needs it)")
    method: JudgeMethod = setting(
        "weighted",
        "llm: weighted (expected rating over the rating tokens' next-token "
        "probabilities; cannot fail to parse) | generate (a reply parsed strictly)",
    )
    engine: Literal["hf", "openai", "vllm"] = setting("hf", "llm generate: the engine")
    aspects: Annotated[list[Aspect], Field(min_length=1)] = setting(
        list(ASPECTS), "llm: the UltraFeedback aspects rated"
    )
    max_length: int = setting(768, "tokens of judge input kept (the response is cut)", ge=16)
    max_new_tokens: int = setting(8, "llm generate: tokens of the reply", ge=1)
    batch_size: int = setting(16, "judge inputs per forward pass (padding can move floats)", ge=1)
    dtype: Dtype = setting("float32", "dtype the judge is loaded in")
    device: str = setting("cpu", "torch device: cpu | cuda | cuda:N", operational=True)
    threads: int | None = setting(
        1,
        "torch CPU threads (null: torch's default; 1 avoids OpenMP stalls on a shared CPU)",
        ge=1,
        operational=True,
    )
