"""Exact and near-duplicate detection over texts (MinHash + LSH banding, deterministic).

Near duplicates are texts whose word 5-gram shingle sets have an estimated Jaccard
similarity at or above the threshold. Signatures use 64 hash functions of the form
(a*x + b) mod p over 32-bit blake2b shingle hashes (a, b < 2^32, so the products fit
uint64 and the whole signature is one vectorised numpy expression); 16 bands of 4 rows propose candidate
pairs, which are then checked on the full signature. Every step is seeded, so the same
input always gives the same duplicates, and the first occurrence is the one kept.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)
_P = (1 << 61) - 1
_N_HASHES, _BANDS = 64, 16


def normalize(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def exact_key(text: str) -> str:
    return hashlib.sha1(normalize(text).encode()).hexdigest()


def _shingles(text: str, k: int = 5) -> np.ndarray:
    words = _WORD.findall(text.lower())
    grams = {" ".join(words[i:i + k]) for i in range(max(1, len(words) - k + 1))} if words else {""}
    return np.array([int.from_bytes(hashlib.blake2b(g.encode(), digest_size=4).digest(), "little")
                     for g in grams], dtype=np.uint64)


class MinHasher:
    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 1 << 32, size=_N_HASHES, dtype=np.uint64)[:, None]
        self.b = rng.integers(0, 1 << 32, size=_N_HASHES, dtype=np.uint64)[:, None]

    def signature(self, text: str) -> np.ndarray:
        x = _shingles(text)[None, :]
        return ((self.a * x + self.b) % np.uint64(_P)).min(axis=1)


def near_duplicates(texts: list[str], threshold: float = 0.9, seed: int = 0) -> dict[int, int]:
    """{index: index of the earlier text it duplicates} for texts at or above `threshold`."""
    hasher = MinHasher(seed)
    sigs = [hasher.signature(t) for t in texts]
    rows = _N_HASHES // _BANDS
    buckets: dict[tuple, list[int]] = {}
    dup_of: dict[int, int] = {}
    for i, sig in enumerate(sigs):
        candidates = set()
        for band in range(_BANDS):
            key = (band, sig[band * rows:(band + 1) * rows].tobytes())
            candidates.update(buckets.get(key, ()))
        for j in sorted(candidates):
            if j not in dup_of and float(np.mean(sigs[j] == sig)) >= threshold:
                dup_of[i] = j
                break
        if i not in dup_of:  # only originals enter the index
            for band in range(_BANDS):
                buckets.setdefault((band, sig[band * rows:(band + 1) * rows].tobytes()), []).append(i)
    return dup_of
