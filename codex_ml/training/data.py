"""Training blocks. The stage reads them from the tokenize stage's shards (data.tokens.TokenBlocks);
`pack` makes the same blocks in memory from texts, as run_clm.py's group_texts does (tokenize each
document, append EOS, concatenate, cut into `block_size` pieces, drop the remainder), for tests and
benchmarks on a handful of documents."""

from __future__ import annotations

import os
from collections.abc import Iterable
from unittest import mock

import numpy as np
import torch

from .. import io


def parallel_tokenizers():
    """The Rust tokenizers' threads on, whatever TOKENIZERS_PARALLELISM says (the Makefile and the
    GPU scripts turn them off, against the warning a later fork prints): each document's ids are
    the same either way. Packing the default corpus: 1.7 s vs 3.0 s on 2 cores; on a 16-core GPU
    host the 161 MB site-packages corpus had taken ~2 minutes on one."""
    return mock.patch.dict(os.environ, TOKENIZERS_PARALLELISM="true")


def pack(texts: Iterable[str], tokenizer, block_size: int, batch_docs: int = 256) -> torch.Tensor:
    """Return a LongTensor [n_blocks, block_size] of token ids with EOS between documents."""
    eos = tokenizer.eos_token_id
    with parallel_tokenizers():
        docs = [np.asarray(ids + [eos], dtype=np.int64)
                for batch in io.chunked(texts, batch_docs)
                for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]]
    flat = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
    n = len(flat) // block_size
    return torch.from_numpy(flat[: n * block_size].reshape(n, block_size).copy())


class Blocks(torch.utils.data.Dataset):
    """Blocks (a LongTensor, or data.tokens.TokenBlocks over memory-mapped shards) as the dicts
    the training loop reads; labels = inputs (the model shifts them)."""

    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        x = torch.as_tensor(self.blocks[i])
        return {"input_ids": x, "labels": x}


def evenly_spaced(blocks, n: int) -> torch.Tensor:
    """At most n blocks spread over the whole split, so a capped val set still covers every part."""
    if len(blocks) <= n:
        idx = range(len(blocks))
    else:
        idx = torch.linspace(0, len(blocks) - 1, n).round().long().tolist()
    if isinstance(blocks, torch.Tensor):
        return blocks[list(idx)]
    return torch.stack([torch.as_tensor(blocks[i]) for i in idx])
