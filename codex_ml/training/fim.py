"""Fill-in-the-middle training blocks (train.fim), the transformation of bigcode-project/Megatron-LM's
`gpt_dataset.py` `permute()` (StarCoder, SantaCoder; Bavarian et al. 2022), written for our blocks.

Block i of the token stream (documents separated by EOS) is cut at its EOS tokens into segments;
each non-empty segment, with probability `rate`, is decoded to text, cut at two uniformly drawn
character positions into prefix / middle / suffix, the three parts encoded separately and reordered

    PSM: <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle
    SPM: <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle   (probability `spm_rate`;
         Megatron's "variant 2" of the FIM paper)

then the block is rebuilt with the EOS tokens where they were, truncated to block_size or padded
with <fim_pad> (labels -100 there: padding is never a target). Segments at a block's edges are
fragments of documents, as in Megatron (context-level FIM). A segment whose decoded text holds
U+FFFD (a multi-byte character cut at the block's edge, or one the document really had) is kept as
it is: re-encoding it would train on a character that was never in the data.

The draws come from a generator seeded by (seed, block index) alone, so the data of a step do not
depend on what ran before: a run resumed after kill -9 sees the same blocks. Documents' text
is encoded with special-token text kept as text, so a document spelling "<fim_prefix>" never puts
the sentinel id into training; only this module places sentinels, by id. rate 0 never builds this
wrapper (engine.train gets the plain blocks: the same batches as without FIM).
"""

from __future__ import annotations

import numpy as np
import torch

from ..stage import UserError
from ..tokenizer import FIM_MIDDLE, FIM_PAD, FIM_PREFIX, FIM_SUFFIX, fim_ids

IGNORE = -100  # transformers' ignore index for labels


class FimBlocks(torch.utils.data.Dataset):
    """Blocks (anything indexable giving block_size ids) as the training loop's {"input_ids", "labels"}
    dicts, FIM applied per document segment (see the module docstring)."""

    def __init__(self, blocks, tokenizer, rate: float, spm_rate: float, seed: int):
        ids = fim_ids(tokenizer)
        if ids is None:
            raise UserError(f"train.fim.rate = {rate}: the tokenizer lacks the FIM sentinels "
                            f"{FIM_PREFIX} {FIM_MIDDLE} {FIM_SUFFIX} {FIM_PAD}; retrain it "
                            "(dvc repro train_tokenizer) or set train.fim.rate: 0")
        self.blocks, self.rate, self.spm_rate, self.seed = blocks, rate, spm_rate, seed
        self.prefix, self.middle, self.suffix, self.pad = (
            ids[FIM_PREFIX], ids[FIM_MIDDLE], ids[FIM_SUFFIX], ids[FIM_PAD])
        self.eos = tokenizer.eos_token_id
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # The Rust tokenizer itself: ~10x less overhead a call than the transformers wrapper.
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_str(backend.to_str())
            self._tok.encode_special_tokens = True  # document text never becomes a special id
        else:  # a slow (Python) tokenizer of a pretrained base
            self._tok = None
            self._slow = tokenizer

    def __len__(self) -> int:
        return len(self.blocks)

    def _decode(self, ids: list[int]) -> str:
        if self._tok is not None:
            return self._tok.decode(ids, skip_special_tokens=False)
        return self._slow.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if self._tok is not None:
            return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        return self._slow(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def permute(self, seg: list[int], rng: np.random.Generator) -> list[int]:
        """One document segment, FIM-reordered with probability `rate`, else unchanged."""
        if rng.random() >= self.rate:
            return seg
        text = self._decode(seg)
        if "\ufffd" in text:
            return seg
        lo, hi = sorted(rng.integers(0, len(text) + 1, size=2).tolist())
        prefix, middle, suffix = self._encode([text[:lo], text[lo:hi], text[hi:]])
        if rng.random() < self.spm_rate:
            return [self.prefix, self.suffix, *suffix, self.middle, *prefix, *middle]
        return [self.prefix, *prefix, self.suffix, *suffix, self.middle, *middle]

    def __getitem__(self, i: int) -> dict:
        block = np.asarray(self.blocks[i]).tolist()
        n = len(block)
        rng = np.random.default_rng([self.seed, i])
        out: list[int] = []
        start = 0
        for end in [k for k, t in enumerate(block) if t == self.eos] + [n]:
            if end > start:
                out += self.permute(block[start:end], rng)
            if end < n:
                out.append(self.eos)
            start = end + 1
        out = out[:n]
        real = len(out)
        x = torch.tensor(out + [self.pad] * (n - real), dtype=torch.long)
        labels = x.clone()
        labels[real:] = IGNORE
        return {"input_ids": x, "labels": labels}


def wrap(blocks, tokenizer, fim, seed: int):
    """The train blocks for `train.fim`: FimBlocks, or the blocks themselves at rate 0."""
    if fim.rate == 0:
        return blocks
    return FimBlocks(blocks, tokenizer, fim.rate, fim.spm_rate, seed)
