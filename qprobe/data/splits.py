"""Which split each source goes to: one rule for the bench and for imported public IQA sets.

Splits are by source (a pristine photo and every image made from it, or a reference and its
distortions), so no scene is in two splits. :func:`assign_splits` orders the sources by a seeded
hash of each one's key (:func:`stable_int`), so a source's place does not depend on which other
sources are present, then cuts that order into train, val and test by largest-remainder counts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from qprobe.data.manifest import SPLITS


def stable_int(*parts: object) -> int:
    """A 128-bit integer from ``parts``, the same on every machine and run (unlike ``hash``)."""
    digest = hashlib.sha256("\0".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:16], "big")


def _split_counts(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """How many of ``n`` sources each split of ``fractions`` gets.

    Largest remainder: each split gets the whole part of its share, and the sources left over go to
    the splits that lost most to rounding down. Then, when there are at least as many sources as
    splits with a positive fraction, each of those splits gets at least one (so a handful of sources
    still gives a non-empty val and test split); with fewer, the first of them (train, where it has
    a share) still gets one. Each such source comes from the split that has most and can spare one.
    """
    names = [s for s in SPLITS if fractions.get(s, 0) > 0]
    exact = {s: fractions[s] * n for s in names}
    counts = {s: int(exact[s]) for s in names}
    for s in sorted(names, key=lambda s: counts[s] - exact[s])[: n - sum(counts.values())]:
        counts[s] += 1
    owed = names if n >= len(names) else names[:min(n, 1)]
    for s in owed:
        while counts[s] == 0:
            donor = max((d for d in names if counts[d] > (d in owed)), key=lambda d: counts[d])
            counts[donor] -= 1
            counts[s] += 1
    return counts


def assign_splits(keys: Sequence[str], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """``{key: split}`` for source ``keys``: the seeded order cut by :func:`_split_counts`."""
    counts = _split_counts(len(keys), fractions)
    ordered = sorted(keys, key=lambda k: stable_int("split", seed, k))
    result: dict[str, str] = {}
    start = 0
    for split, count in counts.items():
        result.update((key, split) for key in ordered[start: start + count])
        start += count
    return result
