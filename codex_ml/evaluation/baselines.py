"""Compression baselines: what a general-purpose compressor achieves on the same documents.

Each document is compressed on its own (gzip -9, xz -9), like the model scores each document on its
own, so container headers are paid per file by both. A model whose bits per byte is not clearly
below these has learned little about code.
"""

from __future__ import annotations

import gzip
import lzma


def compressed_bits(data: bytes) -> dict[str, int]:
    return {"gzip": 8 * len(gzip.compress(data, compresslevel=9, mtime=0)),
            "xz": 8 * len(lzma.compress(data, format=lzma.FORMAT_XZ, preset=9))}
