"""The data path at corpus scale: every stage's MB/s and peak memory on a corpus of a chosen size.

    .venv/bin/python bench/bench_data.py --gb 1 --gb 4 [--scaling-gb 1] [--work /tmp/bench_data]

For each size it builds a corpus offline from this virtualenv's site-packages `.py` files (copy k
of a file starts with the line `# corpus copy k of <path>`: code unchanged, every copy distinct for
the exact dedup), then runs ingest → sanitize → split → train_tokenizer → tokenize → train_model
(`--steps` steps of the default model) → evaluate (`--eval-docs` documents) → report, each as
its own `python stages/<stage>.py` in a workspace of this repository's code. Per stage: wall time,
MB/s of the stage's input, and the peak of the summed RSS of the stage's process tree (its
workers included), sampled every 0.1 s. train_model also reports its time to the first optimizer
step (dvclive's first loss row, logged every step).

In the same run: raw `tokenizers` batch encoding (`Tokenizer.encode_batch`, its own Rust threads on
all cores) of the first `--raw-mb` MB of the train split's text, against which tokenize's whole-stage
MB/s is put; and at `--scaling-gb`, sanitize and tokenize again with data.workers 1, for the ratio of
two workers to one. Output: a table per size and the targets of the data-path issue, checked.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
COPY = ["stages", "codex_ml", "configs", "params.yaml", "requirements.lock"]
STAGES = ["ingest", "sanitize", "split", "train_tokenizer", "tokenize", "train_model", "evaluate",
          "report"]
SCRIPT = {"tokenize": "tokenize_splits"}


def build_corpus(out: Path, gb: float) -> tuple[int, int]:
    """Copies of site-packages' .py files until `gb` GB; returns (files, bytes)."""
    root = Path(sysconfig.get_paths()["purelib"])
    files = sorted(p for p in root.rglob("*.py") if p.is_file() and "__pycache__" not in p.parts)
    target, n, total, k = gb * 1e9, 0, 0, 0
    while total < target:
        for f in files:
            try:
                data = f.read_bytes()
            except OSError:
                continue
            rel = f.relative_to(root).as_posix()
            dest = out / f"copy{k:03d}" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f"# corpus copy {k} of {rel}\n".encode() + data)
            n += 1
            total += len(data)
            if total >= target:
                break
        k += 1
    return n, total


def snapshot(work: Path) -> tuple[Path, str]:
    """The committed code (git HEAD) once, so every size of a run uses the same code."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    code = work / f"code-{commit[:12]}"
    if not code.exists():
        code.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", commit, *COPY], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
    return code, commit


def workspace(work: Path, code: Path, corpus: Path, steps: int, eval_docs: int, workers) -> Path:
    ws = work / "ws"
    if ws.exists():
        shutil.rmtree(ws)
    shutil.copytree(code, ws)
    p = yaml.safe_load((ws / "params.yaml").read_text())
    p["ingest"]["sources"] = [{"kind": "directory", "name": "corpus", "path": str(corpus),
                               "include": ["**/*.py"]}]
    p["data"]["workers"] = workers
    p["train"].update(max_steps=steps, log_every=1, eval_every=max(steps, 1), save_every=max(steps, 1))
    p["eval"].update(max_docs=eval_docs)
    p["eval"]["completion"]["num_prompts"] = 4
    # The code-model parts of evaluate run, but small: they are not what this measures.
    p["eval"]["humaneval"].update(problems=4, num_samples=2)
    p["eval"]["infill"]["num_docs"] = 8
    (ws / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    return ws


def set_workers(ws: Path, workers) -> None:
    p = yaml.safe_load((ws / "params.yaml").read_text())
    p["data"]["workers"] = workers
    (ws / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def run_stage(ws: Path, stage: str, *args: str) -> dict:
    """Run one stage, sampling its process tree's summed RSS; returns wall seconds and peak MB.
    For train_model also the seconds until dvclive's loss file shows the first step (logged at
    every step): its time to the first optimizer step."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1",
               TOKENIZERS_PARALLELISM="false", DVC_NO_ANALYTICS="1")
    t0 = time.perf_counter()
    log = open(ws / f"{stage}.log", "w")
    proc = subprocess.Popen([sys.executable, f"stages/{SCRIPT.get(stage, stage)}.py", *args],
                            cwd=ws, env=env, stdout=log, stderr=subprocess.STDOUT)
    ps, peak, first = psutil.Process(proc.pid), 0, None
    loss = ws / "metrics/train/plots/metrics/loss.tsv"
    if stage == "train_model" and loss.exists():
        loss.unlink()
    while proc.poll() is None:
        if stage == "train_model" and first is None and loss.exists() and \
                loss.read_text().count("\n") >= 2:
            first = round(time.perf_counter() - t0, 1)
        try:
            tree = [ps, *ps.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{stage} exited {proc.returncode}; see {ws / (stage + '.log')}:\n"
                         + (ws / f"{stage}.log").read_text()[-2000:])
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(peak / 2**20), "first_step_s": first}


def raw_tokenizers_mb_s(ws: Path, mb: float) -> tuple[float, float]:
    """MB/s of tokenizers' own batch encoding (Rust threads on all cores) of the train split's
    first `mb` MB, and the MB encoded. Reading the Parquet is not timed."""
    code = f"""
import os, sys, time
os.environ["TOKENIZERS_PARALLELISM"] = "true"
sys.path.insert(0, ".")
from tokenizers import Tokenizer
from codex_ml import io
tok = Tokenizer.from_file("models/tokenizer/tokenizer.json")
texts, n = [], 0
for b in io.iter_batches("data/splits", "train", ["text"]):
    for t in b.column("text").to_pylist():
        texts.append(t); n += len(t.encode())
    if n >= {mb} * 1e6:
        break
batches = [texts[i:i + 1024] for i in range(0, len(texts), 1024)]
t0 = time.perf_counter()
for b in batches:
    tok.encode_batch(b, add_special_tokens=False)
print(n / 1e6 / (time.perf_counter() - t0), n / 1e6)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ws, capture_output=True, text=True,
                         check=True).stdout.split()
    return float(out[0]), float(out[1])


def bench_size(args, gb: float) -> dict:
    work = Path(args.work) / f"{gb:g}gb"
    corpus = work / "corpus"
    if not (work / "corpus.json").exists():
        shutil.rmtree(corpus, ignore_errors=True)
        t0 = time.perf_counter()
        files, nbytes = build_corpus(corpus, gb)
        (work / "corpus.json").write_text(json.dumps({"files": files, "bytes": nbytes}))
        print(f"[{gb:g} GB] corpus: {files} files, {nbytes / 1e9:.2f} GB, built in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    info = json.loads((work / "corpus.json").read_text())
    ws = workspace(work, args.code, corpus, args.steps, args.eval_docs, "auto")
    rows = {}
    for stage in STAGES:
        r = run_stage(ws, stage)
        m = {"ingest": "ingest", "sanitize": "sanitize", "split": "split",
             "train_tokenizer": "tokenizer", "tokenize": "tokenize", "train_model": "train",
             "evaluate": "eval"}.get(stage)
        metrics = json.loads((ws / "metrics" / f"{m}.json").read_text()) if m else {}
        mb_in = {"ingest": info["bytes"], "sanitize": metrics.get("bytes_in"),
                 "split": json.loads((ws / "metrics/sanitize.json").read_text())["bytes_out"]
                 if stage == "split" else None,
                 "train_tokenizer": json.loads((ws / "metrics/split.json").read_text())["train"]["bytes"]
                 if stage == "train_tokenizer" else None,
                 "tokenize": sum(metrics[s]["bytes"] for s in ("train", "val", "test"))
                 if stage == "tokenize" else None}.get(stage)
        r["mb_s"] = round(mb_in / 1e6 / r["wall_s"], 2) if mb_in else None
        if stage == "train_model":
            r["steps"] = metrics.get("steps")
        rows[stage] = r
        print(f"[{gb:g} GB] {stage}: {r['wall_s']} s, {r['mb_s']} MB/s, peak RSS {r['peak_rss_mb']} MB"
              + (f", first step at {r['first_step_s']} s" if stage == "train_model" else ""),
              flush=True)
    raw, raw_mb = raw_tokenizers_mb_s(ws, args.raw_mb)
    rows["raw_tokenizers"] = {"mb_s": round(raw, 2), "mb": round(raw_mb)}
    print(f"[{gb:g} GB] raw tokenizers encode_batch ({raw_mb:.0f} MB, {os.cpu_count()} cores): "
          f"{raw:.2f} MB/s; tokenize / raw = {rows['tokenize']['mb_s'] / raw:.2f}x", flush=True)
    if gb in args.scaling_gb:
        set_workers(ws, 1)
        for stage in ("sanitize", "tokenize"):
            out = ws / "data" / ("sanitized" if stage == "sanitize" else "tokens")
            before = {f.name: f.read_bytes() for f in sorted(out.iterdir())}
            r = run_stage(ws, stage)
            same = before == {f.name: f.read_bytes() for f in sorted(out.iterdir())}
            speedup = round(r["wall_s"] / rows[stage]["wall_s"], 2)
            rows[f"{stage}_1_worker"] = {**r, "speedup_2_vs_1": speedup, "same_bytes": same}
            print(f"[{gb:g} GB] {stage} with 1 worker: {r['wall_s']} s, peak RSS {r['peak_rss_mb']} MB;"
                  f" {os.cpu_count()} workers / 1 = {speedup}x, same bytes: {same}", flush=True)
        set_workers(ws, "auto")
    for k, r in rows.items():
        if k != "train_model":
            r.pop("first_step_s", None)
    return {"gb": gb, "corpus": info, "stages": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, action="append", help="corpus sizes (repeatable)")
    ap.add_argument("--scaling-gb", type=float, action="append", default=None)
    ap.add_argument("--work", default="/tmp/bench_data")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-docs", type=int, default=64)
    ap.add_argument("--raw-mb", type=float, default=256)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--compare-json", help="an earlier run's --json: its sizes join this run's "
                    "tables and targets (say so when its code differs)")
    args = ap.parse_args()
    args.gb = args.gb or [1.0]
    args.scaling_gb = args.scaling_gb if args.scaling_gb is not None else args.gb[:1]
    args.code, commit = snapshot(Path(args.work))
    print(f"code: git {commit} (committed files only)", flush=True)
    results = [bench_size(args, gb) for gb in args.gb]
    if args.compare_json:
        earlier = json.loads(Path(args.compare_json).read_text())
        print(f"compared with {args.compare_json} (git {earlier['commit']})")
        results = sorted(earlier["results"] + results, key=lambda r: r["gb"])
    print("\n| stage | " + " | ".join(f"{r['gb']:g} GB: s / MB/s / peak MB" for r in results) + " |")
    print("|---|" + "---:|" * len(results))
    for stage in STAGES:
        cells = [f"{r['stages'][stage]['wall_s']} / {r['stages'][stage]['mb_s']} / "
                 f"{r['stages'][stage]['peak_rss_mb']}" for r in results]
        print(f"| {stage} | " + " | ".join(cells) + " |")
    print("\ntargets:")
    ok = True

    def check(name, cond):
        nonlocal ok
        ok &= bool(cond)
        print(f"  [{'ok' if cond else 'MISS'}] {name}")

    for r in results:
        st = r["stages"]
        for s in ("ingest", "sanitize", "split", "tokenize", "train_model"):
            check(f"{r['gb']:g} GB {s} peak RSS {st[s]['peak_rss_mb']} MB <= 2048", st[s]["peak_rss_mb"] <= 2048)
        ratio = st["tokenize"]["mb_s"] / st["raw_tokenizers"]["mb_s"]
        check(f"{r['gb']:g} GB tokenize {ratio:.2f}x raw tokenizers >= 0.8", ratio >= 0.8)
        fs = st["train_model"].get("first_step_s")
        check(f"{r['gb']:g} GB train_model first step at {fs} s <= 15", fs is not None and fs <= 15)
        for s in ("sanitize", "tokenize"):
            if f"{s}_1_worker" in st:
                x = st[f"{s}_1_worker"]
                check(f"{r['gb']:g} GB {s} 2 workers {x['speedup_2_vs_1']}x 1 worker >= 1.8, same bytes",
                      x["speedup_2_vs_1"] >= 1.8 and x["same_bytes"])
    if len(results) > 1:
        a, b = results[0]["stages"], results[-1]["stages"]
        for s in STAGES:
            growth = b[s]["peak_rss_mb"] / max(a[s]["peak_rss_mb"], 1)
            check(f"{s} peak RSS {results[0]['gb']:g} → {results[-1]['gb']:g} GB: {growth:.2f}x "
                  "(within 20%)", growth <= 1.2)
    if args.json:
        Path(args.json).write_text(json.dumps({"commit": commit, "cores": os.cpu_count(),
                                               "results": results}, indent=2))
    print("all targets met" if ok else "some targets missed")


if __name__ == "__main__":
    main()
