"""The tokenizer library: lossless round-trip, HF/SentencePiece agreement, determinism, errors."""

import sysconfig
from pathlib import Path

import pytest

from codex_ml import io, params
from codex_ml.stage import UserError
from codex_ml import tokenizer as T

STDLIB = Path(sysconfig.get_paths()["stdlib"])
ROOT_HINT = Path(__file__).resolve().parents[1]  # repo root, for subprocess tests

HOSTILE = [
    "", "\n", "\n\n\n\n", "x", " ", "    ", "\t", "\t\tif x:\n\t\t\treturn y\n",
    "def f():\n\tif a:\n        return b  \n",          # mixed tabs and spaces, trailing spaces
    "line1\r\nline2\r\n\r\n", "a\rb", "trailing   \n  \n", " lead", "x" * 50_000,
    "a = 1" + " " * 300 + "# far comment\n", "\n" * 100, "😀👍🏽 🇺🇳 family: 👨‍👩‍👧", "שלום עולם مرحبا بالعالم\n",
    "mixed ltr שלום rtl\u200f\u202e reversed\u202c", "é = e\u0301  ﬁ ＡＢＣ ① ½",   # NFKC would change these
    "\x00\x01\x7f\ufeffbom\u200bzwsp", "▁ literal sentencepiece marker ▁▁ x▁", "\ue000\ue001\ue002▁\ue000",
    "<s></s><unk><pad> tokens as text", "<0x41> byte piece text", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010ffff",
    "    " * 40 + "deep()\n", "s = '''\n\n\n'''\n\n\n\nclass A:\n    pass\n",
]


def _stdlib_docs(names):
    out = []
    for n in names:
        for f in sorted((STDLIB / n).glob("*.py")) if (STDLIB / n).is_dir() else [STDLIB / f"{n}.py"]:
            out.append(f.read_text("utf-8"))
    return out


def write_splits(d: Path) -> Path:
    """A small real corpus: some stdlib packages for train, others for val, hostile docs for test."""
    d.mkdir(parents=True, exist_ok=True)
    parts = {"train": _stdlib_docs(["json", "email", "argparse", "textwrap"]),
             "val": _stdlib_docs(["csv", "shlex"]), "test": _stdlib_docs(["glob"]) + HOSTILE}
    for name, texts in parts.items():
        w = io.ShardWriter(d, name)
        for i, t in enumerate(texts):
            w.add({"id": io.sha256_text(t), "source": "t", "path": f"{name}/{i}.py", "lang": "python",
                   "text": t, "bytes": len(t.encode("utf-8"))})
        w.close()
    return d


def small_params(**tok) -> params.Params:
    return params.Params(tokenizer=params.Tokenizer(**{"vocab_size": 800, **tok}))


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    return write_splits(tmp_path_factory.mktemp("splits"))


@pytest.fixture(scope="module")
def trained(splits, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    metrics = T.train_dir(splits, out, small_params())
    return out, metrics


def test_metrics_and_files(trained):
    out, m = trained
    assert sorted(p.name for p in out.iterdir()) == ["spm.model", "tokenizer.json", "tokenizer_config.json"]
    assert m["trained"] and m["vocab_size"] == 800
    assert m["roundtrip_exact"] == 1.0 and m["hf_sp_identical"] == 1.0
    assert m["val_bytes_per_token"] > 2 and m["test_bytes_per_token"] > 1
    assert 0 < m["byte_fallback_share"] < 0.5 and m["train_seconds"] >= 0
    assert m["test_docs"] == len(HOSTILE) + len(_stdlib_docs(["glob"]))


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_round_trip_and_hf_agreement(trained, text):
    sp, hf = T.load_sp(trained[0]), T.load(trained[0])
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    assert hf(text)["input_ids"] == ids
    assert hf.decode(ids) == text


def test_special_ids_and_no_bos_eos(trained):
    sp, hf = T.load_sp(trained[0]), T.load(trained[0])
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    assert (hf.unk_token, hf.bos_token, hf.eos_token, hf.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    # the FIM sentinels: control symbols 4-7, then the byte pieces
    assert [sp.id_to_piece(i) for i in range(4, 9)] == [*T.FIM_TOKENS, "<0x00>"]
    assert all(sp.is_control(i) for i in range(1, 8)) and sp.is_byte(8)
    assert T.fim_ids(hf) == dict(zip(T.FIM_TOKENS, range(4, 8)))
    assert set(range(8)) <= set(hf.all_special_ids)
    ids = hf("x = 1\n</s><s>")["input_ids"]   # no BOS/EOS added, special text stays text
    assert ids == sp.encode("x = 1\n</s><s>") and not {0, 1, 2, 3} & set(ids)
    assert hf.decode(ids + [2], skip_special_tokens=True) == "x = 1\n</s><s>"


INJECT = "x = '<fim_prefix>'\n<fim_suffix><fim_middle>y<fim_pad>\n</s><s><fim_prefix >\n"


def test_sentinel_text_in_a_document_never_becomes_a_sentinel_id(trained, tmp_path):
    """A training document spelling the sentinels cannot inject control tokens: not through
    SentencePiece, the HF export (AutoTokenizer), its Rust backend the tokenize stage's workers
    use, nor the shards that stage writes."""
    from transformers import AutoTokenizer
    from tokenizers import Tokenizer
    from codex_ml.data import engine, tokens

    special = set(range(8))
    sp = T.load_sp(trained[0])
    auto = AutoTokenizer.from_pretrained(str(trained[0]), local_files_only=True)
    ids = sp.encode(INJECT)
    assert not special & set(ids) and sp.decode(ids) == INJECT
    assert auto(INJECT)["input_ids"] == ids and auto(INJECT, add_special_tokens=True)["input_ids"] == ids
    assert auto.decode(ids) == INJECT
    # the backend as tokens.py rebuilds it in its workers
    backend = Tokenizer.from_str(auto.backend_tokenizer.to_str())
    assert auto.backend_tokenizer.encode_special_tokens is True
    backend.encode_special_tokens = True
    assert backend.encode(INJECT, add_special_tokens=False).ids == ids
    # ...and without that flag it would inject: the flag is what protects the shards
    backend.encode_special_tokens = False
    assert {4, 5, 6, 7} <= set(backend.encode(INJECT, add_special_tokens=False).ids)
    inj = tmp_path / "inj"
    inj.mkdir()
    for name in ("train", "val", "test"):
        w = io.ShardWriter(inj, name)
        w.add({"id": io.sha256_text(INJECT + name), "source": "t", "path": f"{name}/x.py",
               "lang": "python", "text": INJECT, "bytes": len(INJECT.encode())})
        w.close()
    (inj / "manifest.json").write_text('{"dataset_version": "inj"}')
    with engine.Engine("local", 1) as eng:
        tokens.tokenize(inj, trained[0], tmp_path / "shards", 1 << 20, eng)
    docs = tokens.documents(tmp_path / "shards", "train")
    assert [d.tolist() for d in docs] == [ids + [2]]


def test_user_defined_symbols_cannot_be_a_sentinel():
    with pytest.raises(ValueError, match="fill-in-the-middle sentinel"):
        params.Tokenizer(user_defined_symbols=["<fim_middle>"])


def test_newlines_and_indentation_are_cheap(trained):
    sp = T.load_sp(trained[0])
    for ws in ("\n", "    ", "        ", "\n\n"):
        assert len(sp.encode(ws)) == 1, ws
    assert len(sp.encode("\n" * 10)) <= 5
    body = "def f(x):\n    if x:\n        return x\n    return None\n"
    assert len(sp.encode(body)) <= 20  # far fewer than its 51 characters


def test_chunks_cut_at_line_ends_and_rejoin():
    text = "a\n" * 100 + "é" * 5000 + "\nlast"
    cs = list(T.chunks(text, 64))
    assert "".join(cs) == text
    assert all(len(c.encode()) <= 64 for c in cs)
    assert cs[0] == "a\n" * 32 and list(T.chunks("", 64)) == []


def test_sampling_is_seeded():
    texts = [f"doc {i}\n" for i in range(1000)]
    a = T.sample_chunks(texts, 64, 50, seed=1)
    assert a == T.sample_chunks(texts, 64, 50, seed=1) != T.sample_chunks(texts, 64, 50, seed=2)
    assert len(a) == 50 and T.sample_chunks(texts, 64, 0, seed=1) == texts


def test_deterministic_model_bytes(splits, trained, tmp_path):
    T.train_dir(splits, tmp_path / "again", small_params())
    assert (tmp_path / "again/spm.model").read_bytes() == (trained[0] / "spm.model").read_bytes()
    assert (tmp_path / "again/tokenizer.json").read_bytes() == (trained[0] / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("tok", [dict(user_defined_symbols=["\n", "<|fim|>", "\t"]),
                                 dict(split_by_whitespace=True, split_digits=False),
                                 dict(model_type="unigram", vocab_size=600)],
                         ids=["user-defined", "split-ws", "unigram"])
def test_other_settings_stay_lossless_and_agree(splits, tmp_path, tok):
    m = T.train_dir(splits, tmp_path / "t", small_params(**tok))
    assert m["roundtrip_exact"] == 1.0 and m["hf_sp_identical"] == 1.0
    if "user_defined_symbols" in tok:
        sp = T.load_sp(tmp_path / "t")
        assert sp.encode("a<|fim|>b\n", out_type=str)[1:] == ["<|fim|>", "b", "\n"]


def test_pretrained_base_copies_its_tokenizer(trained, tmp_path):
    p = params.Params(model=params.Model(init="pretrained", base=str(trained[0])))
    m = T.train_dir("does/not/matter", tmp_path / "copy", p)
    assert m["trained"] is False and m["source"] == "pretrained" and m["eos_id"] == 2
    assert T.load(tmp_path / "copy")("x\n")["input_ids"] == T.load(trained[0])("x\n")["input_ids"]
    assert m["fim_sentinels"] == "present" and m["fim_ids"] == dict(zip(T.FIM_TOKENS, range(4, 8)))


def test_pretrained_base_without_sentinels_gets_them_added(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "x": 2, "=": 3, "1": 4}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", eos_token="</s>").save_pretrained(
        tmp_path / "base")
    p = params.Params(model=params.Model(init="pretrained", base=str(tmp_path / "base")))
    m = T.train_dir("does/not/matter", tmp_path / "copy", p)
    assert m["fim_sentinels"] == "added" and m["vocab_size"] == 5 + 4
    tok = T.load(tmp_path / "copy")
    assert T.fim_ids(tok) == m["fim_ids"] == dict(zip(T.FIM_TOKENS, range(5, 9)))
    assert tok("x = 1")["input_ids"] == [2, 3, 4]


def test_bad_params_and_inputs(tmp_path, splits):
    (tmp_path / "p.yaml").write_text("tokenizer:\n  byte_fallback: false\n")
    with pytest.raises(UserError, match=r"tokenizer\.byte_fallback = False: must be true"):
        params.load(tmp_path / "p.yaml")
    with pytest.raises(ValueError, match="reserved"):
        params.Tokenizer(user_defined_symbols=["a b"])
    with pytest.raises(UserError, match="vocab_size = 900000 does not fit"):
        T.train_dir(splits, tmp_path / "big", small_params(vocab_size=900_000))
    assert not (tmp_path / "big").exists()
    with pytest.raises(UserError, match="no Parquet table 'train'"):
        T.train_dir(tmp_path / "empty", tmp_path / "x", small_params())


def test_missing_and_corrupt_models(trained, tmp_path):
    with pytest.raises(UserError, match="no tokenizer model"):
        T.load_sp(tmp_path)
    with pytest.raises(UserError, match="no Hugging Face tokenizer"):
        T.load(tmp_path)
    (tmp_path / "spm.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a valid SentencePiece model"):
        T.load_sp(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    (tmp_path / "tokenizer_config.json").write_text((trained[0] / "tokenizer_config.json").read_text())
    with pytest.raises(UserError, match="cannot load the tokenizer"):
        T.load(tmp_path)
