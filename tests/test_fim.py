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
    """rate 0: the loop gets the plain blocks (the same batches) and the same weights come out;
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


# ---------------------------------------------------------------- inference and evaluation
class Oracle(torch.nn.Module):
    """A stand-in causal LM whose `generate` answers a known prompt with known ids (a line break
    and more after them), so the infilling path is checked from prompt to score."""

    def __init__(self, answers: dict, name: str = ""):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.answers, self.name_or_path, self.calls = answers, name, []
        self.config = type("C", (), {"max_position_embeddings": 4096})()

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, **kw):
        self.calls.append(dict(eos_token_id=eos_token_id, **kw))
        rows = []
        for x, m in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = [t for t, k in zip(x, m) if k]
            rows.append(x + self.answers.get(tuple(prompt), [])[:max_new_tokens])
        width = max(map(len, rows))
        return torch.tensor([r + [0] * (width - len(r)) for r in rows])


def test_infill_task_hides_one_non_blank_line_the_same_every_run():
    from codex_ml.evaluation.infill import make_task

    text = "import os\n\n\ndef f(x):\n    return x\r\n\nprint(f(1))\n"
    pre, mid, suf = make_task(text)
    assert pre + mid + suf == text and mid.strip() and "\n" not in mid and "\r" not in mid
    assert suf.startswith(("\n", "\r\n")) and make_task(text) == (pre, mid, suf)
    mids = {make_task(text + "#" * k)[1] for k in range(30)}  # the draw depends on the text
    assert len(mids) > 1
    assert make_task("\n  \n\n") is None and make_task("") is None


def test_psm_prompt_spells_training_order_and_keeps_the_text_next_to_the_hole(workspace):  # noqa: F811
    from codex_ml.tokenizer import psm_prompt

    tok, _, _ = tiny_blocks(workspace)
    ids = fim_ids(tok)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    pre, suf = "def f(x):\n    y = x * 2\n", "\n    return y\n"
    assert psm_prompt(tok, pre, suf) == [tok.eos_token_id, ids["<fim_prefix>"], *enc(pre),
                                         ids["<fim_suffix>"], *enc(suf), ids["<fim_middle>"]]
    long_pre, long_suf = "a = 1\n" * 200, "b = 2\n" * 200
    cut = psm_prompt(tok, long_pre, long_suf, 40)
    assert len(cut) == 40
    i = cut.index(ids["<fim_suffix>"])
    assert cut[2:i] == enc(long_pre)[-(i - 2):] and cut[i + 1:-1] == enc(long_suf)[:len(cut) - i - 2]
    assert abs((i - 2) - (len(cut) - i - 2)) <= 1  # both sides get half the room
    short = psm_prompt(tok, "x = 1\n", long_suf, 40)  # a short prefix leaves its room to the suffix
    assert len(short) == 40 and short[2:short.index(ids["<fim_suffix>"])] == enc("x = 1\n")
    assert set(psm_prompt(tok, HOSTILE, HOSTILE)[2:-1]) & set(ids.values()) == {ids["<fim_suffix>"]}


def _oracle_for(tok, docs, right: bool, name=""):
    from codex_ml.evaluation.infill import make_task
    from codex_ml.tokenizer import psm_prompt

    answers = {}
    for d in docs:
        pre, mid, suf = make_task(d["text"])
        said = mid if right else mid + " # wrong"
        answers[tuple(psm_prompt(tok, pre, suf, 4096 - 16))] = (
            tok(said + "\n    more()\n", add_special_tokens=False)["input_ids"])
    return Oracle(answers, name)


def test_infill_evaluation_scores_the_generated_line(workspace, tmp_path):  # noqa: F811
    from codex_ml.evaluation import infill
    from codex_ml.params import Infill

    tok, _, _ = tiny_blocks(workspace)
    docs = [{"id": str(i), "path": f"{i}.py", "text": t} for i, t in enumerate(stdlib_texts(6))]
    cfg = Infill(num_docs=5, max_new_tokens=64)
    recs, sec = infill.evaluate(_oracle_for(tok, docs, True), tok, docs, cfg, 4096, 100, 0)
    assert sec["enabled"] and sec["docs"] == 5 and len(recs) == 5
    assert sec["exact_match"]["value"] == 1.0 and sec["edit_similarity"]["value"] == 1.0
    assert all(r["prediction"] == r["hidden_line"] for r in recs)  # cut at the line break
    recs, sec = infill.evaluate(model := _oracle_for(tok, docs, False), tok, docs, cfg, 4096, 100, 0)
    assert sec["exact_match"]["value"] == 0.0 and 0.3 < sec["edit_similarity"]["value"] < 1.0
    assert sec["exact_match"]["ci_low"] <= 0.0 <= sec["exact_match"]["ci_high"]
    stops = model.calls[0]["eos_token_id"]
    assert set(stops) == {tok.eos_token_id, fim_ids(tok)["<fim_pad>"]}


def test_infill_is_skipped_for_a_model_trained_without_fim(workspace, tmp_path):  # noqa: F811
    import json

    from codex_ml.evaluation import infill
    from codex_ml.params import Infill
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok, _, _ = tiny_blocks(workspace)
    docs = [{"id": "0", "path": "0.py", "text": "x = 1\n"}]
    (tmp_path / "provenance.json").write_text(json.dumps({"fim": {"rate": 0.0, "spm_rate": 0.5}}))
    _, sec = infill.evaluate(Oracle({}, str(tmp_path)), tok, docs, Infill(), 4096, 100, 0)
    assert sec == {"enabled": False, "skipped": f"trained without FIM (train.fim.rate = 0.0 in "
                                                f"{tmp_path / 'provenance.json'})"}
    (tmp_path / "provenance.json").write_text(json.dumps({"seed": 1}))  # a model from before FIM
    assert "absent" in infill.evaluate(Oracle({}, str(tmp_path)), tok, docs, Infill(), 4096, 100, 0)[1]["skipped"]
    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1},
                                                                                unk_token="<unk>")),
                                    unk_token="<unk>", eos_token="</s>")
    assert infill.evaluate(Oracle({}), plain, docs, Infill(), 4096, 100, 0)[1]["skipped"] == \
        "the tokenizer has no FIM sentinels"
    assert infill.evaluate(Oracle({}), tok, docs, Infill(num_docs=0), 4096, 100, 0)[1]["skipped"] == \
        "eval.infill.num_docs = 0"


def test_generate_with_a_suffix_infills_and_without_continues(workspace):  # noqa: F811
    from codex_ml.modeling.generate import generate
    from codex_ml.tokenizer import psm_prompt

    tok, _, _ = tiny_blocks(workspace)
    pre, suf = "def f(x):\n", "\n    return y\n"
    middle = tok("    y = x + 1", add_special_tokens=False)["input_ids"]
    plain = [tok.eos_token_id, *tok(pre, add_special_tokens=False)["input_ids"]]
    model = Oracle({tuple(psm_prompt(tok, pre, suf, 4096 - 8)): middle + [tok.eos_token_id],
                    tuple(plain): tok("    pass", add_special_tokens=False)["input_ids"]})
    assert generate(model, tok, pre, 8, temperature=0, suffix=suf) == "    y = x + 1"
    assert model.calls[-1]["eos_token_id"] == [tok.eos_token_id, fim_ids(tok)["<fim_pad>"]]
    assert generate(model, tok, pre, 8, temperature=0) == "    pass"
    assert model.calls[-1]["eos_token_id"] == [tok.eos_token_id]


def test_fim_blocks_in_loader_workers_train_the_same_weights(workspace, tmp_path):  # noqa: F811
    """The GPU profile loads FIM blocks in worker processes (train.num_workers): the blocks are a
    function of their index alone, so the weights are those of loading them in the main process."""
    from codex_ml import modeling

    tok, tr, va = tiny_blocks(workspace)
    weights = []
    for workers in (0, 2):
        p = params(train=dict(max_steps=6, save_every=1000, eval_every=1000, num_workers=workers))
        torch.manual_seed(p.seed)
        model = modeling.build(p.model, tok, 32)
        engine.train(model, fim.wrap(tr, tok, p.train.fim, p.seed), va, p.train, seed=p.seed,
                     out_dir=tmp_path / str(workers))
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
