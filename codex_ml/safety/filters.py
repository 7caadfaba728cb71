"""Quality filters, exact deduplication and MinHash near-duplicate removal."""

from __future__ import annotations

import hashlib
import re
import string

import numpy as np

_ALNUM_RUN = re.compile(r"[^\W_]+")
_ASCII_ALNUM = (string.ascii_letters + string.digits).encode()
_TRAILING_WS = re.compile(r"[ \t\r\f\v]+$", re.M)
_WORD = re.compile(r"\w+")


def quality_reason(text: str, min_chars: int, max_line_length: int,
                   min_alnum_fraction: float) -> str | None:
    """Why a document fails the quality filters (a metrics key), or None when it passes."""
    if len(text.strip()) < min_chars:
        return "too_short"
    if max(map(len, text.split("\n"))) > max_line_length:
        return "long_line"  # minified, generated or data blobs
    if min_alnum_fraction > 0 and text:
        if text.isascii():  # bytes.translate deletes at C speed, ~10x the regex
            alnum = len(text) - len(text.encode("ascii").translate(None, _ASCII_ALNUM))
        else:
            alnum = sum(map(len, _ALNUM_RUN.findall(text)))
        if alnum < min_alnum_fraction * len(text):
            return "low_alnum"
    return None


def normalized_digest(text: str) -> bytes:
    """Hash that ignores line endings, trailing spaces and leading/trailing blank lines."""
    norm = text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text
    if " \n" in norm or "\t\n" in norm or "\f" in norm or "\v" in norm or norm[-1:] in " \t":
        norm = _TRAILING_WS.sub("", norm)  # the slow path, only when there is something to strip
    norm = norm.strip("\n")
    return hashlib.blake2b(norm.encode("utf-8"), digest_size=16).digest()


class ExactDedup:
    def __init__(self):
        self.digests: set[bytes] = set()

    def seen(self, digest: bytes) -> bool:
        """Whether a document with this normalized_digest came before (and remember it)."""
        if digest in self.digests:
            return True
        self.digests.add(digest)
        return False

    def is_duplicate(self, text: str) -> bool:
        return self.seen(normalized_digest(text))


class NearDedup:
    """Drop a document whose estimated Jaccard similarity (word shingles) to a kept one is at
    least `threshold`; the first document of a cluster, in input order, is the one kept."""

    def __init__(self, threshold: float, num_perm: int, shingle_size: int, seed: int = 1):
        from datasketch import MinHash, MinHashLSH

        self._minhash, self.num_perm, self.k = MinHash, num_perm, shingle_size
        self._template = MinHash(num_perm=num_perm, seed=seed)  # permutations drawn once
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.n = 0

    def signature(self, text: str) -> np.ndarray:
        """The MinHash of a document's word shingles (its own work: runs in any process)."""
        words = _WORD.findall(text)
        k = min(self.k, max(1, len(words)))
        shingles = {" ".join(words[i:i + k]).encode() for i in range(max(1, len(words) - k + 1))}
        m = self._new()
        m.update_batch(list(shingles))
        return m.hashvalues

    def _new(self, hashvalues=None):
        t = self._template
        return self._minhash(num_perm=self.num_perm, seed=t.seed, permutations=t.permutations,
                             scheme=t.scheme, hashvalues=hashvalues)

    def seen(self, signature: np.ndarray) -> bool:
        """Whether a kept document is this similar (and keep this one's signature if not)."""
        if self.lsh_hit(signature):
            return True
        self.lsh.insert(str(self.n), self._new(signature))
        self.n += 1
        return False

    def bands(self, signature: np.ndarray) -> np.ndarray:
        """The signature's LSH band keys (the index's own banding), 8 bytes each: two documents
        are candidates when any band matches. Stable across processes, unlike hash()."""
        b, r = self.lsh.b, self.lsh.r
        return np.array([int.from_bytes(hashlib.blake2b(signature[j * r:(j + 1) * r].tobytes(),
                                                        digest_size=8).digest(), "little")
                         for j in range(b)], dtype=np.uint64)

    def lsh_hit(self, signature: np.ndarray) -> bool:
        """Whether a kept document is this similar (the index unchanged)."""
        return bool(self.lsh.query(self._new(signature)))

    def is_duplicate(self, text: str) -> bool:
        return self.seen(self.signature(text))
