"""Prompt hashing and the train/dev/test split by prompt.

``prompt_id`` is a stable 128-bit hash of the instruction (32 hex digits), computed by a Numba
kernel (:func:`hash128`; :func:`prompt_id` is its plain-Python reference). A seeded hash of a
prompt's text, as a fraction u of 2**64, decides its split (:func:`split_codes`):
``test_prefs`` when u < ``test_fraction``, ``dev_prefs`` when ``test_fraction`` <= u <
``test_fraction + dev_fraction``, else ``train_prefs``. The same prompt is always on the same
side, for every strategy; the dev split is carved from the train side, so ``test_prefs`` does
not depend on ``dev_fraction`` and ``dev_fraction = 0`` gives the two-way split.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from numba import njit

from karma.pairing.layouts import SPLITS
from karma.pairing.rng import MASK, SPLIT_STREAM, splitmix64, splitmix64_nb


@njit(cache=True)
def hash128_kernel(data: np.ndarray, offsets: np.ndarray, out: np.ndarray) -> None:
    """The 128-bit hash of each string ``data[offsets[i]:offsets[i + 1]]`` into ``out[i]``."""
    for i in range(offsets.shape[0] - 1):
        lo = offsets[i]
        hi = offsets[i + 1]
        h1 = np.uint64(0xCBF29CE484222325) ^ np.uint64(hi - lo)
        h2 = np.uint64(0x6A09E667F3BCC909)
        for k in range(lo, hi, 8):  # 8 bytes (little-endian, zero-padded) per step
            w = np.uint64(0)
            for j in range(min(8, hi - k)):
                w |= np.uint64(data[k + j]) << np.uint64(8 * j)
            h1 = (h1 ^ w) * np.uint64(0x100000001B3)
            h1 ^= h1 >> np.uint64(32)
            h2 = (h2 + w + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
            h2 ^= h2 >> np.uint64(29)
        out[i, 0] = splitmix64_nb(h1, h2)
        out[i, 1] = splitmix64_nb(h2, h1)


def prompt_id(text: str) -> str:
    """Plain-Python reference of :func:`prompt_ids` for one instruction."""
    data = text.encode("utf-8")
    h1 = 0xCBF29CE484222325 ^ len(data)
    h2 = 0x6A09E667F3BCC909
    for k in range(0, len(data), 8):
        w = int.from_bytes(data[k : k + 8], "little")
        h1 = ((h1 ^ w) * 0x100000001B3) & MASK
        h1 ^= h1 >> 32
        h2 = ((h2 + w + 1) * 0x9E3779B97F4A7C15) & MASK
        h2 ^= h2 >> 29
    return f"{splitmix64(h1, h2):016x}{splitmix64(h2, h1):016x}"


_HEX_PAIRS = np.array(  # byte -> its two hex digits as one little-endian uint16
    [ord(f"{b:02x}"[0]) | (ord(f"{b:02x}"[1]) << 8) for b in range(256)], dtype="<u2"
)


def hash128(texts: pl.Series) -> np.ndarray:
    """The 128-bit hash of each string as ``(n, 2)`` uint64 (Numba kernel; see prompt_id)."""
    import pyarrow as pa

    arr = texts.to_arrow(compat_level=pl.CompatLevel.oldest())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.type != pa.large_string():
        arr = arr.cast(pa.large_string())
    n = len(arr)
    out = np.zeros((n, 2), dtype=np.uint64)
    if n:
        _, off, data = arr.buffers()
        offsets = np.frombuffer(off, dtype=np.int64)[arr.offset : arr.offset + n + 1]
        raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(1, np.uint8)
        hash128_kernel(raw, np.ascontiguousarray(offsets), out)
    return out


def prompt_ids(instructions: pl.Series, hashes: np.ndarray | None = None) -> pl.Series:
    """``prompt_id`` of each instruction: a stable 128-bit hash (32 hex digits) of its UTF-8
    bytes, computed by a Numba kernel (sha256 in a Python loop is several times slower);
    ``hashes``: their :func:`hash128`, when already computed."""
    import pyarrow as pa

    out = hash128(instructions) if hashes is None else hashes
    n = out.shape[0]
    big_endian = out.astype(">u8").view(np.uint8).reshape(n, 16)
    chars = _HEX_PAIRS[big_endian]  # (n, 16) uint16 = (n, 32) ASCII bytes
    offsets32 = np.arange(0, 32 * n + 1, 32, dtype=np.int64)
    hexes = pa.Array.from_buffers(
        pa.large_string(),
        n,
        [None, pa.py_buffer(offsets32), pa.py_buffer(np.ascontiguousarray(chars))],
    )
    out_series = pl.from_arrow(hexes)
    assert isinstance(out_series, pl.Series)
    return out_series.alias("prompt_id")


@njit(cache=True)
def _split_kernel(h: np.ndarray, stream: np.uint64, threshold: np.uint64, out: np.ndarray) -> None:
    for i in range(h.shape[0]):
        out[i] = splitmix64_nb(stream, h[i]) < threshold


#: Split codes of :func:`split_codes`, indexing :data:`SPLIT_NAMES`.
TRAIN, TEST, DEV = 0, 1, 2
#: The written name of each split code.
SPLIT_NAMES = SPLITS


@njit(cache=True)
def _codes_kernel(
    h: np.ndarray, stream: np.uint64, test_end: np.uint64, dev_end: np.uint64, out: np.ndarray
) -> None:
    for i in range(h.shape[0]):
        u = splitmix64_nb(stream, h[i])
        out[i] = 1 if u < test_end else (2 if u < dev_end else 0)


def _threshold(fraction: float) -> int:
    return min(int(fraction * 2.0**64), MASK)


def is_test(
    prompts: pl.Series, *, seed: int, fraction: float, hashes: np.ndarray | None = None
) -> np.ndarray:
    """Whether each prompt belongs to ``test_prefs``: a seeded hash of its text below
    ``fraction`` (the same prompt is always on the same side; no prompt is in both);
    ``hashes``: their :func:`hash128`, when already computed."""
    out = np.zeros(prompts.len(), dtype=np.bool_)
    if fraction > 0 and prompts.len():
        h = np.ascontiguousarray((hash128(prompts) if hashes is None else hashes)[:, 0])
        stream = np.uint64(splitmix64(seed, SPLIT_STREAM))
        _split_kernel(h, stream, np.uint64(_threshold(fraction)), out)
    return out


def is_test_reference(prompt: str, *, seed: int, fraction: float) -> bool:
    """Plain-Python reference of :func:`is_test` for one prompt."""
    h = int(prompt_id(prompt)[:16], 16)
    return fraction > 0 and splitmix64(splitmix64(seed, SPLIT_STREAM), h) < _threshold(fraction)


def split_codes(
    prompts: pl.Series,
    *,
    seed: int,
    test_fraction: float,
    dev_fraction: float = 0.0,
    hashes: np.ndarray | None = None,
) -> np.ndarray:
    """The split of each prompt as a uint8 code (:data:`TRAIN`, :data:`TEST`, :data:`DEV`):
    the seeded hash of :func:`is_test` below ``test_fraction`` is test, below
    ``test_fraction + dev_fraction`` dev, else train (test is exactly :func:`is_test`'s)."""
    out = np.zeros(prompts.len(), dtype=np.uint8)
    if (test_fraction > 0 or dev_fraction > 0) and prompts.len():
        h = np.ascontiguousarray((hash128(prompts) if hashes is None else hashes)[:, 0])
        stream = np.uint64(splitmix64(seed, SPLIT_STREAM))
        test_end = _threshold(test_fraction) if test_fraction > 0 else 0
        dev_end = _threshold(test_fraction + dev_fraction) if dev_fraction > 0 else test_end
        _codes_kernel(h, stream, np.uint64(test_end), np.uint64(dev_end), out)
    return out


def split_code_reference(
    prompt: str, *, seed: int, test_fraction: float, dev_fraction: float = 0.0
) -> int:
    """Plain-Python reference of :func:`split_codes` for one prompt."""
    u = splitmix64(splitmix64(seed, SPLIT_STREAM), int(prompt_id(prompt)[:16], 16))
    if test_fraction > 0 and u < _threshold(test_fraction):
        return TEST
    if dev_fraction > 0 and u < _threshold(test_fraction + dev_fraction):
        return DEV
    return TRAIN
