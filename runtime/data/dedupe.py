"""Exact and near-duplicate detection: digests of whole texts, and MinHash signatures of word
shingles looked up in LSH indexes (both from `datasketch`)."""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import numpy as np

MINHASH_SEED = 1        # fixed, so the same inputs always keep the same documents
LSH_RECALL = 0.99       # chance that a pair exactly at the threshold becomes a candidate
CHANGED_WORDS_TOLERATED = 2  # substituted words a document of any length may have and still match


class ExactDuplicateIndex:
    """Digests of every text seen (kept or dropped as a near duplicate): 16 bytes a document."""

    def __init__(self):
        self._digests: set[bytes] = set()

    def seen_before(self, text: str) -> bool:
        """True if this exact text was seen before; otherwise remember it and return False."""
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if digest in self._digests:
            return True
        self._digests.add(digest)
        return False


_WORD = re.compile(r"\w+")


def words_of(text: str) -> list[str]:
    """The words near-duplicate detection compares: runs of letters and digits, case-folded, so
    changes of punctuation, case or spacing alone do not make two documents differ."""
    return _WORD.findall(text.casefold())


def shingle_size_for(n_words: int, max_shingle: int, threshold: float, num_perm: int = 128) -> int:
    """Words per shingle for a document of `n_words` words; 0 means "too short to compare".

    Each substituted word changes up to k of a document's s = n - k + 1 shingles of k words, so m
    substituted words leave a Jaccard similarity of (s - mk) / (s + mk); that is at least J while
    k <= (n + 1) / (1 + m * (1 + J) / (1 - J)). With long shingles a short document could not lose
    a single word and stay a near duplicate, so shorter documents use shorter shingles: short
    enough that CHANGED_WORDS_TOLERATED substituted words keep J two standard errors of the
    MinHash estimate above `threshold`, so such copies are found reliably, not by a coin toss
    (at 0.8 and 128 permutations: single words up to 58 words, `max_shingle` = 5 from 149).
    Documents too short for that still get single words if one changed word can keep them at
    the threshold (9 words or more at 0.8). Under that even one changed word is a fifth of the
    document: such documents are only dropped as exact copies."""
    standard_error = math.sqrt(threshold * (1.0 - threshold) / num_perm)
    reliable = min(threshold + 2.0 * standard_error, 0.99)
    size = int((n_words + 1) / (1.0 + CHANGED_WORDS_TOLERATED * _odds(reliable)))
    # (- 1e-9: at 0.8 the odds come out as 9.000000000000002, and 9 words must qualify.)
    if size == 0 and n_words + 1 >= 1.0 + _odds(threshold) - 1e-9:
        size = 1
    return min(max_shingle, size)


def _odds(similarity: float) -> float:
    """Shingles a document needs per shingle changed to stay at `similarity`: (1 + J) / (1 - J)."""
    return (1.0 + similarity) / (1.0 - similarity)


def shingles_of(words: list[str], size: int) -> set[bytes]:
    return {" ".join(words[i:i + size]).encode("utf-8") for i in range(len(words) - size + 1)}


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) for the LSH index: the longest rows (fewest chance candidates) with which a
    pair exactly at `threshold` still shares a band with probability LSH_RECALL.

    datasketch's own optimiser balances false positives against false negatives and finds only
    about 40% of the pairs at 0.8; every candidate is checked against the signatures afterwards,
    so here recall is what matters."""
    for rows in range(num_perm // 2, 0, -1):
        bands = num_perm // rows
        if bands >= 2 and 1.0 - (1.0 - threshold ** rows) ** bands >= LSH_RECALL:
            return bands, rows
    return num_perm, 1


@dataclass
class NearMatch:
    kept: int          # the kept document's position in the output
    similarity: float  # estimated Jaccard similarity of the two documents' shingles


class NearDuplicateIndex:
    """MinHash signatures of the kept documents, in one LSH index per shingle size.

    Documents are compared on shingles of the size their length calls for (`shingle_size_for`).
    A near duplicate's length is within a factor `threshold` of its original's, which can put
    the two in neighbouring size classes; so each document is also signed, indexed and looked up
    with the shingle sizes of the shortest document it could match, and a pair always meets at
    the size of the shorter one."""

    def __init__(self, threshold: float, max_shingle: int, num_perm: int):
        try:
            from datasketch import MinHash, MinHashLSH
        except ImportError as err:
            raise ImportError("near-duplicate removal needs the datasketch package "
                              "(pip install 'datasketch>=2.0,<3'); dedup_near=False works without it"
                              ) from err

        self.threshold = threshold
        self.max_shingle = max_shingle
        self.num_perm = num_perm
        self._minhash_class = MinHash
        # One set of permutations shared by every signature: creating them is the slow part of
        # making a MinHash, and signatures can only be compared when they share them.
        self._permutations = MinHash(num_perm=num_perm, seed=MINHASH_SEED).permutations
        self._bands = lsh_bands(threshold, num_perm)
        self._lsh_class = MinHashLSH
        self._lsh: dict[int, object] = {}
        self._signatures: dict[int, dict[int, np.ndarray]] = {}

    def find_or_add(self, key: int, words: list[str]) -> NearMatch | None:
        """The most similar earlier document at or above the threshold; if there is none, the
        document is indexed under `key` and None is returned."""
        sizes = self._shingle_sizes(len(words))
        signed = [(size, self._sign(words, size)) for size in sizes]
        best = None
        for size, minhash in signed:
            match = self._best_match(size, minhash)
            if match is not None and (best is None or match.similarity > best.similarity):
                best = match
        if best is None:
            for size, minhash in signed:
                self._index(size).insert(key, minhash, check_duplication=False)
                self._signatures[size][key] = minhash.hashvalues
        return best

    def _shingle_sizes(self, n_words: int) -> range:
        largest = shingle_size_for(n_words, self.max_shingle, self.threshold, self.num_perm)
        smallest = shingle_size_for(math.floor(n_words * self.threshold), self.max_shingle,
                                    self.threshold, self.num_perm)
        return range(max(smallest, 1), largest + 1)

    def _sign(self, words: list[str], size: int):
        minhash = self._minhash_class(num_perm=self.num_perm, permutations=self._permutations,
                                      scheme="affine32")
        minhash.update_batch(shingles_of(words, size))
        return minhash

    def _best_match(self, size: int, minhash) -> NearMatch | None:
        if size not in self._lsh:
            return None
        signatures = self._signatures[size]
        best = None
        for key in self._lsh[size].query(minhash):
            # The share of equal signature entries estimates the Jaccard similarity; LSH only
            # says the two share a band, which unrelated documents sometimes do.
            similarity = float(np.count_nonzero(signatures[key] == minhash.hashvalues)) / self.num_perm
            if similarity >= self.threshold and (
                best is None or (similarity, -key) > (best.similarity, -best.kept)
            ):
                best = NearMatch(key, similarity)
        return best

    def _index(self, size: int):
        if size not in self._lsh:
            self._lsh[size] = self._lsh_class(num_perm=self.num_perm, params=self._bands)
            self._signatures[size] = {}
        return self._lsh[size]
