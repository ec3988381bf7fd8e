"""Counter-based randomness: SplitMix64 of ``(seed, counter)``, in plain Python and in Numba.

A pair never depends on other instructions or on processing order: the random number of an
instruction is ``splitmix64(stream, row)``, where each strategy has its own ``stream``
(:func:`stream_seed`), so ``random`` and ``rlaif`` draw independent numbers.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from karma.pairing.strategies import strategy_code

MASK = (1 << 64) - 1
#: Counter of the random stream of strategy ``k``: ``splitmix64(seed, STREAM + k)``.
STREAM = 0x5EED_0000
#: Counter of the train/test split's stream.
SPLIT_STREAM = 0x5EED_5EED


def splitmix64(seed: int, row: int) -> int:
    """Counter-based 64-bit random number for ``(seed, row)`` (plain-Python reference)."""
    z = (seed * 0xD1B54A32D192ED03 + row + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def stream_seed(seed: int, strategy: str) -> int:
    """The seed of ``strategy``'s own random stream (``random`` and ``rlaif`` are independent)."""
    return splitmix64(seed, STREAM + strategy_code(strategy))


@njit(cache=True)
def splitmix64_nb(seed: np.uint64, row: np.uint64) -> np.uint64:
    """:func:`splitmix64` in Numba (uint64 arithmetic wraps as the masks do)."""
    z = seed * np.uint64(0xD1B54A32D192ED03) + row + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))
