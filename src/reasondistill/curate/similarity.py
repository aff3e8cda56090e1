"""Text similarity for curation: exact keys, word shingles, MinHash LSH and edit distance.

MinHash LSH (datasketch) only proposes candidate pairs; every candidate is then confirmed with the
exact Jaccard similarity of the two shingle sets, so the decision of a pair is the same whatever
else is in the index (which is what makes near-duplicate removal idempotent). Edit distances
between traces come from rapidfuzz (C++), on words rather than characters: DED's Levenshtein
diversity is O(n·m) per pair, and words cut n and m by about 5×.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from rapidfuzz.distance import Levenshtein

if TYPE_CHECKING:  # datasketch imports scipy (a quarter of a second): imported where an index is built
    from datasketch import MinHash

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Case-folded words and punctuation marks: digits and symbols count, whitespace does not."""
    return _WORD.findall(text.casefold())


def exact_key(text: str) -> str:
    """Equal for texts that differ only in case and whitespace."""
    return hashlib.sha256(" ".join(words(text)).encode()).hexdigest()


def shingles(text: str, size: int) -> frozenset[str]:
    """The set of `size`-word windows of a text (the whole text when it is shorter)."""
    tokens = words(text)
    if len(tokens) <= size:
        return frozenset([" ".join(tokens)])
    return frozenset(" ".join(tokens[i : i + size]) for i in range(len(tokens) - size + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def word_edit_distance(a: str, b: str) -> float:
    """Levenshtein distance over words, divided by the longer length: 0 same, 1 nothing shared."""
    return Levenshtein.normalized_distance(words(a), words(b))


class NearDuplicateIndex:
    """Texts added so far, queried for one whose shingle-set Jaccard similarity reaches `threshold`.

    `exhaustive` compares with every text added (for small sets: building an LSH index costs more
    than a few dozen comparisons); otherwise MinHash LSH proposes the candidates.
    """

    def __init__(
        self, threshold: float, shingle_size: int, num_perm: int, exhaustive: bool = False, seed: int = 1
    ):
        from datasketch import MinHashLSH

        self.threshold, self.shingle_size, self.num_perm, self.seed = threshold, shingle_size, num_perm, seed
        # LSH tuned to a lower threshold than the decision's: more candidates to confirm exactly, and
        # fewer true near-duplicates missed (a pair's chance of becoming a candidate falls steeply
        # below the LSH threshold).
        self.lsh = None if exhaustive else MinHashLSH(threshold=max(0.05, threshold - 0.2), num_perm=num_perm)
        self.sets: dict[str, frozenset[str]] = {}

    def _signature(self, grams: frozenset[str]) -> MinHash:
        from datasketch import MinHash

        signature = MinHash(num_perm=self.num_perm, seed=self.seed)
        signature.update_batch([g.encode() for g in sorted(grams)])
        return signature

    def find(self, text: str) -> tuple[str, float] | None:
        """The most similar indexed text at or above the threshold, as (key, similarity)."""
        grams = shingles(text, self.shingle_size)
        candidates = self.sets if self.lsh is None else self.lsh.query(self._signature(grams))
        matches = [(key, jaccard(grams, self.sets[key])) for key in candidates]
        matches = [(key, similarity) for key, similarity in matches if similarity >= self.threshold]
        return max(matches, key=lambda m: (m[1], m[0])) if matches else None

    def add(self, key: str, text: str) -> None:
        grams = shingles(text, self.shingle_size)
        self.sets[key] = grams
        if self.lsh is not None:
            self.lsh.insert(key, self._signature(grams))


def farthest_first(
    count: int, k: int, distance: Callable[[int, int], float], start: int | None = None
) -> list[int]:
    """Greedy max-min selection of `k` of `count` items (indices, in selection order; all of them
    when k >= count). Starts from `start`, or else from the pair farthest apart (O(count²)
    distances, for small sets), then repeatedly adds the item farthest from everything chosen (ties:
    the earlier item); O(count·k) distances after the start."""
    if k >= count:
        return list(range(count))
    if start is None:
        pairs = [(i, j) for i in range(count) for j in range(i + 1, count)]
        chosen = list(max(pairs, key=lambda p: (distance(*p), -p[0], -p[1]))) if k > 1 else [0]
    else:
        chosen = [start]
    nearest = {i: min(distance(c, i) for c in chosen) for i in range(count) if i not in chosen}
    while len(chosen) < k:
        pick = max(nearest, key=lambda i: (nearest[i], -i))
        chosen.append(pick)
        del nearest[pick]
        for i in nearest:
            nearest[i] = min(nearest[i], distance(pick, i))
    return chosen[:k]
