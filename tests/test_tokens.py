"""The corpus-scale data path: token shards (exact round trip, format, worker-count independence),
the memory-mapped loader, and the data stages' output independent of the engine's worker count."""

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from codex_ml import io, params
from codex_ml.data import tokens as T
from codex_ml.data.engine import Engine
from codex_ml.data.ingest import ingest
from codex_ml.data.split import split
from codex_ml.params import Sanitize
from codex_ml.safety.sanitize import sanitize_table
from codex_ml.stage import UserError
from codex_ml.training.data import pack

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
INJECTION = "x = '</s><s><pad><unk>'  # control-token text inside a document\n"


def files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}


@pytest.fixture(scope="module")
def small_row_groups():
    """Row groups of 64 KB, so a few MB of stdlib make dozens of units for the workers."""
    before = io.ROW_GROUP_BYTES
    io.ROW_GROUP_BYTES = 64 << 10
    yield
    io.ROW_GROUP_BYTES = before


@pytest.fixture(scope="module")
def pipeline_data(tmp_path_factory, small_row_groups):
    """ingest → sanitize → split of a few stdlib packages with one worker, and a tokenizer."""
    from codex_ml import tokenizer

    d = tmp_path_factory.mktemp("data")
    corpus = d / "corpus"
    for pkg in ("json", "email", "http", "logging", "importlib"):
        (corpus / pkg).mkdir(parents=True)
        for f in sorted((STDLIB / pkg).glob("*.py")):
            (corpus / pkg / f.name).write_bytes(f.read_bytes())
    (corpus / "json" / "inject.py").write_text(INJECTION)
    cfg = params.Ingest(sources=[params.DirectorySource(kind="directory", name="c", path=str(corpus))])
    with io.atomic_dir(d / "raw") as tmp:
        ingest(cfg, tmp, Engine(workers=1))
    sanitize_table(d / "raw", d / "san", Sanitize(policy=str(ROOT / "configs/safety_policy.yaml")),
                   engine=Engine(workers=1))
    with io.atomic_dir(d / "splits") as tmp:
        io.write_json(tmp / "manifest.json", split(d / "san", tmp, params.Split(), 1, 256 << 20,
                                                   Engine(workers=1)))
    p = params.Params(tokenizer=params.Tokenizer(vocab_size=600, input_sentence_size=0))
    tokenizer.train_dir(d / "splits", d / "tok", p)
    return {"dir": d, "corpus": cfg}


def test_data_stages_give_the_same_bytes_whatever_the_worker_count(pipeline_data, tmp_path):
    d, cfg = pipeline_data["dir"], pipeline_data["corpus"]
    assert len(io.row_groups(d / "raw", "docs")) > 10  # enough units for both workers
    with io.atomic_dir(tmp_path / "raw") as tmp:
        ingest(cfg, tmp, Engine(workers=2))
    assert files(tmp_path / "raw") == files(d / "raw")
    m = sanitize_table(d / "raw", tmp_path / "san", Sanitize(policy=str(ROOT / "configs/safety_policy.yaml")),
                       engine=Engine(workers=2))
    assert files(tmp_path / "san") == files(d / "san")
    assert m["engine"] == "local engine, 2 workers" and m["docs_out"] > 30
    with io.atomic_dir(tmp_path / "splits") as tmp:
        man = split(d / "san", tmp, params.Split(), 1, 256 << 20, Engine(workers=2))
    assert man == json.loads((d / "splits" / "manifest.json").read_text())
    assert {k: v for k, v in files(tmp_path / "splits").items()} == \
        {k: v for k, v in files(d / "splits").items() if k != "manifest.json"}


def test_exact_dedup_stays_global_across_workers(tmp_path, small_row_groups):
    """Copies far apart, in units run by different workers, still count as duplicates."""
    text = (STDLIB / "textwrap.py").read_text()
    w = io.ShardWriter(tmp_path / "raw", "docs", row_group_bytes=4096)
    (tmp_path / "raw").mkdir()
    for i in range(12):
        t = text if i in (0, 11) else (STDLIB / "shlex.py").read_text() + f"\n# {i}\n"
        w.add({"id": io.sha256_text(t), "source": "s", "path": f"{i}.py", "lang": "python",
               "text": t, "bytes": len(t.encode())})
    w.close()
    assert len(io.row_groups(tmp_path / "raw", "docs")) == 12
    m = sanitize_table(tmp_path / "raw", tmp_path / "san", Sanitize(policy=None),
                       engine=Engine(workers=2))
    assert m["dropped"]["duplicate"] == 1 and m["docs_out"] == 11
    kept = [r["path"] for r in io.iter_rows(tmp_path / "san", "docs", ["path"])]
    assert kept == [f"{i}.py" for i in range(11)]  # the first copy kept, order unchanged


def test_every_document_decodes_from_the_shards_to_its_sanitized_text(pipeline_data, tmp_path):
    from codex_ml.modeling import load_tokenizer

    d = pipeline_data["dir"]
    m = T.tokenize(d / "splits", d / "tok", tmp_path / "tok1", 1 << 28, Engine(workers=1))
    tok = load_tokenizer(d / "tok")
    man = json.loads((tmp_path / "tok1" / "manifest.json").read_text())
    assert man["dtype"] == "uint16" and man["eos_id"] == tok.eos_token_id == 2
    assert man["tokenizer_sha256"] == T.tokenizer_hash(d / "tok")
    assert man["dataset_version"] == json.loads((d / "splits/manifest.json").read_text())["dataset_version"]
    seen_injection = False
    for s in ("train", "val", "test"):
        texts = [r["text"] for r in io.iter_rows(d / "splits", s, ["text"])]
        docs = T.documents(tmp_path / "tok1", s)
        assert len(docs) == len(texts) == man["splits"][s]["documents"] == m[s]["documents"]
        for text, ids in zip(texts, docs):
            assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1].tolist()
            assert ids[:-1].tolist() == tok(text, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids[:-1].tolist()) == text
            seen_injection |= text == INJECTION
        for sh in man["splits"][s]["shards"]:
            assert io.sha256_file(tmp_path / "tok1" / sh["bin"]) == sh["bin_sha256"]
            assert (tmp_path / "tok1" / sh["bin"]).stat().st_size == 2 * sh["tokens"]
    assert seen_injection  # "</s>" written in a document stayed text: no EOS inside any document


def test_shards_are_the_same_bytes_whatever_the_worker_count_and_roll_at_document_ends(
        pipeline_data, tmp_path):
    d = pipeline_data["dir"]
    T.tokenize(d / "splits", d / "tok", tmp_path / "one", 50_000, Engine(workers=1))
    T.tokenize(d / "splits", d / "tok", tmp_path / "two", 50_000, Engine(workers=2))
    assert files(tmp_path / "one") == files(tmp_path / "two")
    man = json.loads((tmp_path / "one" / "manifest.json").read_text())
    shards = man["splits"]["train"]["shards"]
    assert len(shards) > 3
    for sh in shards[:-1]:  # each closes at the first document end past shard_tokens
        idx = np.fromfile(tmp_path / "one" / sh["idx"], dtype="<u8")
        assert idx[0] == 0 and idx[-1] == sh["tokens"] >= 50_000 > idx[-2]


def test_memmapped_blocks_are_the_packed_blocks_across_shard_ends(pipeline_data, tmp_path):
    from codex_ml.modeling import load_tokenizer

    d = pipeline_data["dir"]
    T.tokenize(d / "splits", d / "tok", tmp_path / "t", 30_000, Engine(workers=1))
    texts = [r["text"] for r in io.iter_rows(d / "splits", "train", ["text"])]
    packed = pack(texts, load_tokenizer(d / "tok"), 64).numpy()
    blocks = T.TokenBlocks(tmp_path / "t", "train", 64)
    assert len(blocks) == len(packed) and blocks.docs == len(texts)
    assert all((blocks[i] == packed[i]).all() for i in range(len(blocks)))
    assert (blocks.all() == packed).all()
    with pytest.raises(IndexError):
        blocks[len(blocks)]


def test_a_damaged_shard_is_a_one_line_error(pipeline_data, tmp_path):
    d = pipeline_data["dir"]
    T.tokenize(d / "splits", d / "tok", tmp_path / "t", 1 << 28, Engine(workers=1))
    with open(tmp_path / "t" / "val-00000.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(UserError, match="val-00000.bin: 10 bytes, the manifest says"):
        T.TokenBlocks(tmp_path / "t", "val", 64)
    with pytest.raises(UserError, match="not found .run the tokenize stage"):
        T.TokenBlocks(tmp_path / "nothing", "val", 64)


def test_uint32_shards_for_a_large_vocabulary(tmp_path):
    w = T._SplitWriter(tmp_path, "train", "uint32", 10)
    w.add(np.array([70000, 2, 5, 6, 2], dtype=np.uint32), np.array([2, 3]))
    (sh,) = w.close()
    assert np.fromfile(tmp_path / sh["bin"], dtype="<u4").tolist() == [70000, 2, 5, 6, 2]
    assert np.fromfile(tmp_path / sh["idx"], dtype="<u8").tolist() == [0, 2, 5]


@pytest.fixture
def ray_head():
    """A real one-node Ray cluster on 127.0.0.1 (2 CPUs), stopped after the test."""
    import shutil
    import socket
    import subprocess
    import sys
    import tempfile

    ray = Path(sys.executable).parent / "ray"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths live under it
    subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                    f"--temp-dir={tmp}"], check=True, capture_output=True, timeout=120)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_sanitize_and_tokenize_on_a_ray_cluster_give_the_local_engines_bytes(
        pipeline_data, tmp_path, ray_head):
    d = pipeline_data["dir"]
    cfg = Sanitize(policy=str(ROOT / "configs/safety_policy.yaml"))
    with Engine("ray", ray_address=ray_head) as ray_engine:
        m = sanitize_table(d / "raw", tmp_path / "san", cfg, engine=ray_engine)
        T.tokenize(d / "splits", d / "tok", tmp_path / "tok", 50_000, ray_engine)
    assert m["engine"].startswith("ray engine")
    assert files(tmp_path / "san") == files(d / "san")
    T.tokenize(d / "splits", d / "tok", tmp_path / "local", 50_000, Engine(workers=2))
    assert files(tmp_path / "tok") == files(tmp_path / "local")


def test_ray_without_an_address_is_a_one_line_error(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(UserError, match="no cluster address; set data.ray_address or RAY_ADDRESS"):
        list(Engine("ray").map(T.encode_unit, [("x", 0)], None))
