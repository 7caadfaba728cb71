"""evaluate: bits per byte two ways, bootstrap intervals, metric modules vs sacrebleu, the stage."""

import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import sacrebleu
import torch

from codex_ml import io
from codex_ml.evaluation import completion
from codex_ml.evaluation.bootstrap import mean_ci, ratio_ci
from codex_ml.evaluation.lm import start_token_id, windows
from codex_ml.evaluation.pipeline import evaluate_model, load_model
from codex_ml.params import Params

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_texts(n: int, max_bytes: int = 3000) -> list[str]:
    """Real code: the first n small stdlib modules (sorted, so the same everywhere)."""
    out = []
    for f in sorted(STDLIB.glob("*.py")):
        t = f.read_text(encoding="utf-8", errors="replace")
        if 200 < len(t.encode()) <= max_bytes:
            out.append(t)
        if len(out) == n:
            break
    return out


def build_tiny_model(path: Path, context: int = 64) -> Path:
    """A random 2-layer Llama and a byte-level BPE tokenizer trained on stdlib code, saved as an HF dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(stdlib_texts(40), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=context,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_split(directory: Path, texts: list[str], name: str = "test") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    w = io.ShardWriter(directory, name)
    for i, t in enumerate(texts):
        w.add({"id": io.sha256_text(t), "source": "stdlib", "path": f"f{i}.py", "lang": "python",
               "text": t, "bytes": len(t.encode())})
    w.close()
    return directory


def tiny_params(**eval_kw) -> Params:
    e = {"batch_size": 4, "bootstrap": 200, "completion": {"num_prompts": 3, "prompt_lines": 3,
                                                           "max_new_tokens": 8}}
    e.update(eval_kw)
    return Params.model_validate({"seed": 7, "eval": e})


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: a second thread only adds synchronisation, badly so on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    texts = stdlib_texts(6)
    return {"model": build_tiny_model(root / "model"), "splits": write_split(root / "splits", texts),
            "texts": texts, "root": root}


@pytest.mark.parametrize("n,ctx,stride", [(1, 4, 2), (5, 8, 4), (37, 8, 3), (64, 16, 16), (100, 16, 1)])
def test_windows_score_every_token_once(n, ctx, stride):
    ids = list(range(n + 1))  # ids[0] is the start token
    scored = []
    for inputs, targets, first in windows(ids, ctx, stride):
        assert len(inputs) == len(targets) <= ctx
        assert all(t == i + 1 for i, t in zip(inputs, targets))  # targets are the next tokens
        scored += targets[first:]
    assert scored == list(range(1, n + 1))


def direct_nll(model, ids: list[int], ctx: int, stride: int) -> float:
    """NLL in nats, one forward pass per token, with the history the sliding window gives that token."""
    total = 0.0
    n = len(ids) - 1
    with torch.no_grad():
        for j in range(1, n + 1):
            k = max(0, math.ceil((j - ctx) / stride))  # first window whose end reaches j
            start = k * stride
            logits = model(torch.tensor([ids[start:j]])).logits[0, -1]
            total -= torch.log_softmax(logits.double(), -1)[ids[j]].item()
    return total


@pytest.mark.parametrize("ctx,stride", [(64, 32), (16, 5)])
def test_bits_per_byte_two_ways(tiny, tmp_path, ctx, stride):
    model, tok = load_model(tiny["model"])
    texts = [t[:250] for t in tiny["texts"][:2]]  # one forward pass per token below: keep it short
    splits = write_split(tmp_path / "splits", texts)
    m = evaluate_model(model, tok, splits, tmp_path, tiny_params(context=ctx, stride=stride))
    nll = 0.0
    for t in texts:
        ids = [tok.eos_token_id] + tok(t, add_special_tokens=False)["input_ids"]
        nll += direct_nll(model, ids, ctx, stride)
    nbytes = sum(len(t.encode()) for t in texts)
    assert m["bits_per_byte"]["value"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-4)
    assert m["tokens"] == sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    # the per-document table adds up to the same figure
    docs = pq.read_table(tmp_path / "docs.parquet").to_pydict()
    assert sum(docs["nll_bits"]) / sum(docs["bytes"]) == pytest.approx(m["bits_per_byte"]["value"])


def test_start_token_follows_training_layout(tiny):
    _, tok = load_model(tiny["model"])
    assert start_token_id(tok) == tok.eos_token_id  # packed as text + EOS, no BOS added by the tokenizer
    tok.add_bos_token = True  # Llama-style: the tokenizer itself puts BOS first
    tok.update_post_processor()
    assert start_token_id(tok) == tok.bos_token_id


def test_full_context_matches_hf_loss(tiny):
    """A document that fits the context gets exactly Hugging Face's own mean loss (EOS in front)."""
    model, tok = load_model(tiny["model"])
    text = tok.decode(tok(tiny["texts"][0], add_special_tokens=False)["input_ids"][:60])
    ids = [tok.eos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) <= 64
    from codex_ml.evaluation.lm import Scorer

    sc = Scorer(model, tok, context=64, stride=32, batch_size=2)
    sc.add([text])
    s = sc.finish()
    with torch.no_grad():
        hf = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert s.tokens[0] == len(ids) - 1
    assert s.nll[0] / s.tokens[0] == pytest.approx(hf, rel=1e-5)


def test_bootstrap_contains_point_and_shrinks():
    rng = np.random.default_rng(0)

    def width(n):
        nbytes = rng.integers(200, 20000, n).astype(float)
        bits = nbytes * rng.normal(2.0, 0.4, n).clip(0.5)
        point, lo, hi = ratio_ci({"bpb": bits}, {"bpb": nbytes}, resamples=1000, seed=1)["bpb"]
        assert point == pytest.approx(bits.sum() / nbytes.sum())  # sum/sum, not a mean of ratios
        assert lo <= point <= hi
        return hi - lo

    small, large = width(20), width(2000)
    assert large < small / 5  # about 1/sqrt(100) of the width
    # seeded: the same draws give the same interval
    x = {"a": rng.random(50)}
    assert mean_ci(x, 300, seed=3) == mean_ci(x, 300, seed=3)


def test_bleu_and_chrf_equal_sacrebleu():
    preds = ["def add(a, b):\n    return a + b", "for i in range(10):\n    print(i)", "x = foo(bar)",
             "import os", "return None"]
    refs = ["def add(x, y):\n    return x + y", "for i in range(n):\n    print(i, end='')",
            "x = foo(bar, baz)", "import sys", "return None"]
    bleu = completion.load_metric("bleu").compute(predictions=preds, references=refs)
    chrf = completion.load_metric("chrf").compute(predictions=preds, references=refs, per_sample=True)
    assert bleu["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score, abs=1e-9)
    assert chrf["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score, abs=1e-9)
    assert chrf["scores"][4] == pytest.approx(100.0)
    corpus, per = completion.score(preds, refs)
    assert corpus["exact_match_line"] == pytest.approx(1 / 5)  # only "return None" matches
    assert per[4]["edit_similarity"] == 1.0 and per[4]["rougeL"] == 1.0


def test_make_prompt_cuts_before_a_drawn_nonblank_line_the_same_every_time():
    text = "a = 1\nb = 2\n\n\nc = 3\nd = 4\n"
    prompt, rest = completion.make_prompt(text, 2)
    assert rest in ("c = 3\nd = 4\n", "d = 4\n")  # a non-blank line after the first two
    assert prompt + "\n" + rest == text  # the last break left to the model
    assert completion.make_prompt(text, 2) == (prompt, rest)
    assert completion.make_prompt("a\nb\n", 2) is None and completion.make_prompt("a\nb\n\n \n", 2) is None
    assert completion.make_prompt("a\r\nb\r\nc\r\n", 2) == ("a\r\nb", "c\r\n")
    assert completion.heal("\n    return x") == "    return x" and completion.heal("x") == "x"
    # Files that open alike are cut in different places (the GPU profile's corpus: cut after
    # their first lines, 32 files gave 32 times the same license header as the prompt).
    header = "".join(f"# license line {i}\n" for i in range(13))
    docs = [header + "".join(f"x{j} = {d}\n" for j in range(40)) for d in range(32)]
    assert len({completion.make_prompt(d, 8)[0].count("\n") for d in docs}) > 10


def test_completions_start_on_the_line_after_the_prompt(tiny):
    """The prompt ends where a line ended, without its break: the first token must be one."""
    model, tok = load_model(tiny["model"])
    prompts = [completion.make_prompt(t, 3)[0] for t in tiny["texts"]]
    out = completion.generate(model, tok, prompts, max_new_tokens=4, context=64, batch_size=4)
    assert len(out) == 6 and all(o.startswith(("\n", "\r")) for o in out), out


def test_evaluate_outputs(tiny, tmp_path):
    model, tok = load_model(tiny["model"])
    m = evaluate_model(model, tok, tiny["splits"], tmp_path, tiny_params())
    assert m["docs"] == 6 and m["bytes"] == sum(len(t.encode()) for t in tiny["texts"])
    for k in ("loss", "perplexity", "bits_per_byte", "top1_accuracy", "top5_accuracy"):
        assert m[k]["ci_low"] <= m[k]["value"] <= m[k]["ci_high"], k
    assert m["top1_accuracy"]["value"] <= m["top5_accuracy"]["value"]
    assert m["perplexity"]["value"] == pytest.approx(math.exp(m["loss"]["value"]))
    g = m["baselines"]["gzip_bits_per_byte"]["value"]
    assert 1.0 < g < 5.0 and m["bits_per_byte"]["value"] > g  # a random model loses to gzip
    preds = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == m["completion"]["samples"] == 3
    assert {"prompt", "prediction", "reference", "next_line", "scores"} <= set(preds[0])


@pytest.mark.slow
def test_stage_script(tiny, tmp_path):
    (tmp_path / "params.yaml").write_text(
        "seed: 3\neval:\n  bootstrap: 100\n  completion: {num_prompts: 2, max_new_tokens: 4}\n")
    cmd = [sys.executable, "stages/evaluate.py", "--params", str(tmp_path / "params.yaml"),
           "--model", str(tiny["model"]), "--splits", str(tiny["splits"]),
           "--out", str(tmp_path / "eval"), "--metrics", str(tmp_path / "eval.json"),
           "--doc-scores", str(tmp_path / "eval_docs.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    committed = (ROOT / "metrics" / "eval_docs.json").read_bytes()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    # Every output where the command said: the repository's committed per-document scores are
    # untouched (this test once overwrote them).
    assert (ROOT / "metrics" / "eval_docs.json").read_bytes() == committed
    assert json.loads((tmp_path / "eval_docs.json").read_text())["docs"]
    m = json.loads((tmp_path / "eval.json").read_text())
    assert m["docs"] == 6 and (tmp_path / "eval" / "predictions.jsonl").exists()
    bad = subprocess.run(cmd[:4] + ["--model", str(tmp_path)] + cmd[6:], cwd=ROOT,
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "not a Hugging Face model directory" in bad.stderr
