"""Language-model figures per document: negative log-likelihood, token counts, top-1/top-5 hits.

How a document is scored (the same for every model, so runs compare):
- Its text is tokenized without special tokens and one start token is put in front, the token the
  model saw before a document in training: BOS when the tokenizer adds BOS itself (Llama-style
  pretrained models), else EOS, the separator that run_clm-style packing (ours: text + EOS,
  codex_ml/training/data.py) puts between documents. The first real token is therefore predicted
  like every other token and the NLL covers the whole text; the start token itself is not scored.
- Documents longer than the context are scored with a sliding window: windows of `context` tokens
  advance by `stride`, and each window scores only the tokens no earlier window scored, so every
  token is predicted exactly once and (after the first window) with at least context - stride
  tokens of history.
- Windows from consecutive documents are batched together (right padding, masked), so short files
  do not leave the batch half empty.

Bits per byte = sum of NLL in bits / sum of the documents' UTF-8 bytes: it does not depend on the
tokenizer, so models with different vocabularies compare, and so does gzip.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from ..stage import UserError


@dataclass
class DocScores:
    """Per-document sums, in arrival order. Small scalars only: memory stays flat per document."""
    nll: list[float] = field(default_factory=list)      # nats
    tokens: list[int] = field(default_factory=list)
    top1: list[int] = field(default_factory=list)
    top5: list[int] = field(default_factory=list)

    def add_doc(self) -> int:
        for col in (self.nll, self.tokens, self.top1, self.top5):
            col.append(0)
        return len(self.nll) - 1


def start_token_id(tokenizer) -> int:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    auto = tokenizer("x", add_special_tokens=True)["input_ids"]
    if bos is not None and auto and auto[0] == bos:
        return bos
    for tid in (eos, bos):
        if tid is not None:
            return tid
    raise UserError("the tokenizer has neither a BOS nor an EOS token; one is needed to score "
                    "each document's first token (set bos_token in tokenizer_config.json)")


def context_length(model, override: int | None = None) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if override and limit:
        return min(override, limit)
    if not (override or limit):
        raise UserError("cannot tell the model's context length (no max_position_embeddings in its "
                        "config); set eval.context")
    return override or limit


def windows(ids: list[int], context: int, stride: int) -> Iterator[tuple[list[int], list[int], int]]:
    """Yield (inputs, targets, first) per window over `ids` (start token included at ids[0]).

    inputs[i] predicts targets[i]; only targets[first:] are scored, the rest were scored before.
    """
    n = len(ids) - 1  # number of tokens to predict
    start, done = 0, 0
    while done < n:
        end = min(start + context, n)
        yield ids[start:end], ids[start + 1:end + 1], done - start
        done = end
        start += stride


class Scorer:
    def __init__(self, model, tokenizer, context: int, stride: int, batch_size: int):
        if not 0 < stride <= context:
            raise UserError(f"eval.stride = {stride}: must be between 1 and the context length {context}")
        self.model, self.tok = model, tokenizer
        self.context, self.stride, self.batch_size = context, stride, batch_size
        self.start = start_token_id(tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.start
        self.device = next(model.parameters()).device
        self.scores = DocScores()
        self._pending: list[tuple[int, list[int], list[int], int]] = []

    def add(self, texts: Iterable[str]) -> None:
        texts = list(texts)
        encoded = self.tok(texts, add_special_tokens=False)["input_ids"] if texts else []
        for ids in encoded:
            d = self.scores.add_doc()
            for inputs, targets, first in windows([self.start] + list(ids), self.context, self.stride):
                self._pending.append((d, inputs, targets, first))
                if len(self._pending) >= self.batch_size:
                    self._flush()

    def finish(self) -> DocScores:
        self._flush()
        return self.scores

    @torch.inference_mode()
    def _flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        width = max(len(w[1]) for w in batch)
        x = torch.full((len(batch), width), self.pad, dtype=torch.long)
        y = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, (_, inputs, targets, first) in enumerate(batch):
            x[r, :len(inputs)] = torch.tensor(inputs)
            mask[r, :len(inputs)] = 1
            y[r, first:len(targets)] = torch.tensor(targets[first:])
        logits = self.model(input_ids=x.to(self.device), attention_mask=mask.to(self.device)).logits
        logits = logits.float()
        y = y.to(self.device)
        scored = y != -100
        safe_y = y.clamp_min(0)
        nll = -torch.log_softmax(logits, -1).gather(-1, safe_y[..., None])[..., 0]
        top5 = logits.topk(5, dim=-1).indices
        hit1 = (top5[..., 0] == safe_y) & scored
        hit5 = (top5 == safe_y[..., None]).any(-1) & scored
        nll = torch.where(scored, nll, 0.0).sum(1).tolist()
        ntok, h1, h5 = scored.sum(1).tolist(), hit1.sum(1).tolist(), hit5.sum(1).tolist()
        s = self.scores
        for r, (d, *_rest) in enumerate(batch):
            s.nll[d] += nll[r]
            s.tokens[d] += ntok[r]
            s.top1[d] += h1[r]
            s.top5[d] += h5[r]


def bits(nats: float) -> float:
    return nats / math.log(2)
