"""Fill-in-the-middle: the training transformation (codex_ml/training/fim.py), rate 0 = no FIM,
pretrained bases without sentinels, infilling at inference and its evaluation."""

from __future__ import annotations

import pytest
import torch

from codex_ml.stage import UserError
from codex_ml.tokenizer import FIM_TOKENS, fim_ids
from codex_ml.training import engine, fim
from test_training import one_thread, params, stdlib_texts, tiny_blocks, tiny_llama  # noqa: F401
from test_training import workspace  # noqa: F401 (a fixture)

HOSTILE = "s = '<fim_prefix>x<fim_suffix>y<fim_middle>z<fim_pad>'\nprint(s)\n"


def blocks_of(tok, texts, size):
    flat = []
    for t in texts:
        flat += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(flat) // size
    return torch.tensor(flat[: n * size]).view(n, size)


def segments(ids, eos):
    """Split a list of ids at EOS: the last one runs to the block's end (maybe truncated)."""
    out, cur = [], []
    for t in ids:
        if t == eos:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out, cur


def unpermute(seg, ids, tok):
    """(mode, text of the original segment) from a PSM or SPM segment."""
    p, m, s = ids["<fim_prefix>"], ids["<fim_middle>"], ids["<fim_suffix>"]
    dec = lambda x: tok.decode(x)  # noqa: E731
    assert seg[0] == p and seg.count(p) == seg.count(m) == seg.count(s) == 1, seg
    if seg[1] == s:  # SPM: <pre> <suf> suffix <mid> prefix middle (the prefix/middle cut is lost)
        j = seg.index(m)
        return "spm", seg[2:j], seg[j + 1:]
    i, j = seg.index(s), seg.index(m)
    return "psm", dec(seg[1:i]) + dec(seg[j + 1:]) + dec(seg[i + 1:j]), None


@pytest.mark.parametrize("spm_rate", [0.0, 1.0])
def test_every_document_is_reordered_and_nothing_is_lost(workspace, spm_rate):  # noqa: F811
    tok, _, _ = tiny_blocks(workspace)
    ids = fim_ids(tok)
    texts = [t[:300] for t in stdlib_texts(12)] + [HOSTILE] * 3
    plain = blocks_of(tok, texts, 128)
    ds = fim.FimBlocks(plain, tok, rate=1.0, spm_rate=spm_rate, seed=3)
    eos = tok.eos_token_id
    checked = 0
    for i in range(len(ds)):
        item = ds[i]
        x, y = item["input_ids"].tolist(), item["labels"]
        assert len(x) == 128
        pad = x.count(ids["<fim_pad>"])
        assert (y == -100).sum() == pad and all(t == ids["<fim_pad>"] for t in x[len(x) - pad:])
        new, _ = segments(x, eos)
        old, _ = segments(plain[i].tolist(), eos)
        assert len(new) == len(old)  # EOS stay where the documents ended
        for a, b in zip(new, old):
            if not b:
                continue
            if "\ufffd" in tok.decode(b):  # a character cut at the block's edge: left as it is
                assert a == b
                continue
            mode, text, rest = unpermute(a, ids, tok)
            assert mode == ("spm" if spm_rate else "psm")
            if mode == "psm":
                assert text == tok.decode(b)
            else:  # suffix, then prefix + middle: together the document's text, rotated
                full = tok.decode(b)
                assert full.endswith(tok.decode(text)) and full.startswith(tok.decode(rest))
            checked += 1
    assert checked >= 10


def test_same_block_same_draws_whatever_the_order_and_the_seed_matters(workspace):  # noqa: F811
    tok, train, _ = tiny_blocks(workspace)
    ds = fim.FimBlocks(train, tok, rate=0.5, spm_rate=0.5, seed=1)
    forward = [ds[i]["input_ids"] for i in range(len(ds))]
    again = fim.FimBlocks(train, tok, rate=0.5, spm_rate=0.5, seed=1)
    for i in reversed(range(len(ds))):  # a resumed run asks for blocks in another order
        assert torch.equal(again[i]["input_ids"], forward[i])
    other = fim.FimBlocks(train, tok, rate=0.5, spm_rate=0.5, seed=2)
    assert any(not torch.equal(other[i]["input_ids"], forward[i]) for i in range(len(ds)))
    changed = sum(not torch.equal(forward[i], train[i]) for i in range(len(ds)))
    assert 0.2 * len(ds) < changed < len(ds)  # about half the documents, most blocks touched


def test_document_text_never_becomes_a_sentinel_id(workspace):  # noqa: F811
    tok, _, _ = tiny_blocks(workspace)
    ids = fim_ids(tok)
    plain = blocks_of(tok, [HOSTILE] * 40, 64)
    assert not set(ids.values()) & set(plain.flatten().tolist())
    ds = fim.FimBlocks(plain, tok, rate=1.0, spm_rate=0.5, seed=0)
    for i in range(len(ds)):
        x = ds[i]["input_ids"].tolist()
        segs, last = segments(x, tok.eos_token_id)
        for seg in segs:  # complete segments: exactly the three sentinels this module placed
            assert sum(seg.count(ids[t]) for t in FIM_TOKENS) == 3
            assert seg.count(ids["<fim_prefix>"]) == 1


def test_rate_zero_trains_exactly_as_without_fim(workspace, tmp_path):  # noqa: F811
    """rate 0: the Trainer gets the plain blocks (the same batches) and the same weights come out;
    rate > 0 changes the weights (so this test can tell)."""
    from codex_ml import modeling

    p0 = params(train=dict(max_steps=12, save_every=1000, eval_every=1000, fim=dict(rate=0.0)))
    p5 = params(train=dict(max_steps=12, save_every=1000, eval_every=1000, fim=dict(rate=0.5)))
    tok, tr, va = tiny_blocks(workspace)
    assert fim.wrap(tr, tok, p0.train.fim, p0.seed) is tr
    weights = []
    for data in (tr, fim.wrap(tr, tok, p0.train.fim, p0.seed), fim.wrap(tr, tok, p5.train.fim, p5.seed)):
        torch.manual_seed(p0.seed)
        model = modeling.build(p0.model, tok, 32)
        engine.train(model, data, va, p0.train, seed=p0.seed, out_dir=tmp_path / str(len(weights)))
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_a_tokenizer_without_sentinels_is_refused_for_fim(workspace):  # noqa: F811
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "x": 2}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", eos_token="</s>")
    with pytest.raises(UserError, match=r"train.fim.rate = 0.5: the tokenizer lacks the FIM sentinels"):
        fim.FimBlocks(torch.zeros(4, 8, dtype=torch.long), tok, 0.5, 0.5, 0)
    assert fim.wrap("blocks", tok, params(train=dict(fim=dict(rate=0))).train.fim, 0) == "blocks"


def test_pretrained_base_gets_embedding_rows_for_added_sentinels_but_not_under_lora(workspace):  # noqa: F811
    from codex_ml.training.pipeline import grow_embeddings

    tok, _, _ = tiny_blocks(workspace)
    p = params()
    model = tiny_llama(vocab_size=len(tok) - 4)  # a base whose vocabulary lacks the 4 sentinels
    grow_embeddings(model, tok, p)
    assert model.get_input_embeddings().num_embeddings == len(tok)
    lora = params(model=dict(init="pretrained", base="b", lora=dict(enabled=True)))
    with pytest.raises(UserError, match="LoRA cannot train the new embedding rows"):
        grow_embeddings(tiny_llama(vocab_size=len(tok) - 4), tok, lora)
    no_fim = params(model=dict(init="pretrained", base="b", lora=dict(enabled=True)),
                    train=dict(fim=dict(rate=0)))
    grow_embeddings(m := tiny_llama(vocab_size=len(tok) - 4), tok, no_fim)
    assert m.get_input_embeddings().num_embeddings == len(tok)


def test_fim_params_are_in_the_fingerprint_and_validated():
    from codex_ml import params as P
    from codex_ml.training.pipeline import fingerprint_of

    a = fingerprint_of(params(), {"dataset_version": "v"}, "h")
    b = fingerprint_of(params(train=dict(fim=dict(rate=0.25))), {"dataset_version": "v"}, "h")
    c = fingerprint_of(params(train=dict(fim=dict(spm_rate=0.0))), {"dataset_version": "v"}, "h")
    assert len({a, b, c}) == 3
    with pytest.raises(Exception, match="less than or equal to 1"):
        P.Fim(rate=1.5)
