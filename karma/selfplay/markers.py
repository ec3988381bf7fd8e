"""Self-play round helpers shared by the round's stages: round numbers, markers, weight hashes."""

from __future__ import annotations

import hashlib
from pathlib import Path

from karma.core.errors import KarmaError
from karma.core.io import read_json
from karma.selfplay.settings import MAX_ROUNDS


def round_number(text: str | None) -> int:
    """``--round`` as an int in 1..MAX_ROUNDS (one line naming the flag otherwise)."""
    try:
        k = int(str(text))
    except ValueError:
        k = 0
    if not 1 <= k <= MAX_ROUNDS:
        raise KarmaError("bad round", field="--round", value=text,
                         expected=f"an integer in 1..{MAX_ROUNDS}")  # fmt: skip
    return k


def policy_name(k: int) -> str:
    """The name of the model that samples in round ``k``: ``base`` or ``policy_<k-1>``."""
    return "base" if k == 1 else f"policy_{k - 1}"


def weights_digest(model_dir: str | Path) -> str:
    """SHA-256 (24 hex digits) of a model directory's weight files (safetensors / bin)."""
    p = Path(model_dir)
    files = sorted(f for f in p.rglob("*") if f.suffix in (".safetensors", ".bin"))
    if not files:
        raise KarmaError("no weights in the model directory", file=p,
                         expected="*.safetensors")  # fmt: skip
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(p).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:24]


def read_marker(path: str | Path, k: int) -> bool:
    """Whether round ``k`` is active, from its marker (one line if it is not one)."""
    data = read_json(path)
    if data.get("round") != k or not isinstance(data.get("active"), bool):
        expected = f'{{"round": {k}, "active": true|false}}'
        raise KarmaError("not the marker of this round (rerun sp_plan)", file=path, value=data,
                         expected=expected)  # fmt: skip
    return bool(data["active"])
