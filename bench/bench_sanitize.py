"""Sanitize throughput (MB/s) against detect-secrets on the same input, in the same run.

    .venv/bin/python bench/bench_sanitize.py [--sample-mb 2] [--rounds 3]

Input: the running Python's standard library .py files without tests (~11 MB). detect-secrets is
about a hundred times slower, so both sides are timed on the same spread sample of those files
(every k-th file up to --sample-mb); ours is also timed on the whole corpus. detect-secrets runs
through its Python API with its default plugins and filters (`default_settings()`,
`SecretsCollection.scan_file`) over the very same lines, written to temporary files. Ours is the
whole per-document sanitizer (quality filters, policy, redaction, dedup) with the default policy.

Then both sides scan the labelled corpus (tests/secrets_corpus.py: every kind the stage covers, in
the syntaxes real repositories use, plus placeholders, documented examples and look-alikes that
must stay): per kind, recall (the secret gone and counted under its rule) and precision (against
the must-keep texts that rule changed), and the share of must-keep texts left unchanged.
detect-secrets scores a case when it reports a line of the secret (or the two lines before, for a
PEM block's header); it has no PII plugins, so its PII recall is 0 by design, not by failure. Each
case is written to a file named for its syntax (.py, .yaml, .env, Dockerfile, ...) so its
file-type filters apply.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from codex_ml.params import Sanitize  # noqa: E402
from codex_ml.safety.sanitize import Sanitizer  # noqa: E402
from secrets_corpus import KEEP, POSITIVES  # noqa: E402

SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages", "dist-packages",
             "__pycache__"}

def stdlib_corpus() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if SKIP_DIRS & set(rel.parts[:-1]) or rel.parts[0].startswith("config-") or \
                rel.name.startswith("test_"):
            continue
        try:
            docs.append((str(rel), p.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    return docs


def spread_sample(docs, mb: float):
    total = sum(len(t.encode()) for _, t in docs)
    step = max(1, round(total / (mb * 1e6)))
    return docs[::step]


def ours(docs, rounds: int, decontaminate: bool = False) -> tuple[float, Sanitizer]:
    """Best-of-`rounds` seconds for the whole per-document sanitizer. Against detect-secrets it
    runs without the benchmark decontamination, which detect-secrets has no counterpart of."""
    best = float("inf")
    for _ in range(rounds):
        s = Sanitizer(Sanitize(decontaminate={"enabled": decontaminate}))
        t0 = time.perf_counter()
        for path, text in docs:
            s({"id": "", "source": "b", "path": path, "lang": "python", "text": text,
               "bytes": None})
        best = min(best, time.perf_counter() - t0)
    return best, s


def detect_secrets_scan(docs) -> tuple[float, dict]:
    from detect_secrets import SecretsCollection
    from detect_secrets.settings import default_settings

    with tempfile.TemporaryDirectory() as d, default_settings():
        paths = []
        for i, (_, text) in enumerate(docs):
            p = os.path.join(d, f"doc{i:05d}.py")
            Path(p).write_text(text, encoding="utf-8")
            paths.append(p)
        coll = SecretsCollection()
        t0 = time.perf_counter()
        for p in paths:
            coll.scan_file(p)
        dt = time.perf_counter() - t0
        found: dict = {}
        for _, secret in coll:
            found[secret.type] = found.get(secret.type, 0) + 1
    return dt, found


EXT = {"python": ".py", "js": ".js", "ts": ".ts", "go": ".go", "java": ".java", "yaml": ".yaml",
       "json": ".json", "ini": ".ini", "env": ".env", "shell": ".sh", "terraform": ".tf",
       "xml": ".xml", "properties": ".properties", "prose": ".md", "markdown": ".md",
       "npmrc": ".npmrc", "pypirc": ".pypirc", "csv": ".csv", "k8s": ".yaml",
       "docker": ".yaml", "github": ".yaml", "curl": ".sh", "cli": ".sh"}


def _file_name(syntax: str, i: int) -> str:
    head = syntax.split("-")[0]
    return f"Dockerfile.{i}" if head == "dockerfile" else f"case{i:05d}{EXT.get(head, '.txt')}"


def corpus_scores() -> tuple[dict, dict]:
    """Per-kind recall/precision and must-keep rates for ours and detect-secrets."""
    from detect_secrets import SecretsCollection
    from detect_secrets.settings import default_settings

    s = Sanitizer(Sanitize(min_chars=0, dedup=False, min_alnum_fraction=0.0))
    total, ours_hit, ds_hit, fp = {}, {}, {}, {}
    ours_kept = ds_kept = 0
    with tempfile.TemporaryDirectory() as d, default_settings():
        for i, case in enumerate(POSITIVES):
            before = s.redactions[case.kind]
            out = s({"id": "", "source": "b", "path": "x", "lang": "", "text": case.text,
                     "bytes": None})
            hit = out is not None and case.secret not in out["text"] and \
                s.redactions[case.kind] > before
            p = Path(d) / _file_name(case.syntax, i)
            p.write_text(case.text)
            coll = SecretsCollection()
            coll.scan_file(str(p))
            first = case.text[:case.text.index(case.secret)].count("\n") + 1
            last = first + case.secret.count("\n")
            ds = any(first - 2 <= sec.line_number <= last for _, sec in coll)
            total[case.kind] = total.get(case.kind, 0) + 1
            ours_hit[case.kind] = ours_hit.get(case.kind, 0) + hit
            ds_hit[case.kind] = ds_hit.get(case.kind, 0) + ds
        for i, (_, text) in enumerate(KEEP):
            counts = s.redactions.copy()
            out = s({"id": "", "source": "b", "path": "x", "lang": "", "text": text, "bytes": None})
            ours_kept += out is not None and out["text"] == text
            for kind in s.redactions - counts:
                fp[kind] = fp.get(kind, 0) + 1
            p = Path(d) / f"keep{i:05d}.txt"
            p.write_text(text)
            coll = SecretsCollection()
            coll.scan_file(str(p))
            ds_kept += not any(True for _ in coll)
    kinds = {k: {"cases": n, "recall": round(ours_hit[k] / n, 4),
                 "precision": round(ours_hit[k] / max(1, ours_hit[k] + fp.get(k, 0)), 4),
                 "detect_secrets_recall": round(ds_hit[k] / n, 4)} for k, n in total.items()}
    keep = {"texts": len(KEEP), "ours_kept": round(ours_kept / len(KEEP), 4),
            "detect_secrets_kept": round(ds_kept / len(KEEP), 4)}
    return kinds, keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample-mb", type=float, default=2.0,
                    help="size of the sample both sides scan (detect-secrets runs ~0.1 MB/s)")
    ap.add_argument("--rounds", type=int, default=3, help="best of N rounds for ours")
    ap.add_argument("--out", default="bench/out/sanitize.json")
    args = ap.parse_args()

    docs = stdlib_corpus()
    sample = spread_sample(docs, args.sample_mb)
    mb_all = sum(len(t.encode()) for _, t in docs) / 1e6
    mb = sum(len(t.encode()) for _, t in sample) / 1e6
    print(f"corpus: {len(docs)} stdlib files, {mb_all:.1f} MB; sample: {len(sample)} files, "
          f"{mb:.2f} MB")

    t_all, s_all = ours(docs, args.rounds)
    t_decon, _ = ours(docs, args.rounds, decontaminate=True)
    t_ours, _ = ours(sample, args.rounds)
    t_ds, ds_found = detect_secrets_scan(sample)
    ratio = (mb / t_ours) / (mb / t_ds)
    print(f"ours, full corpus:   {mb_all / t_all:7.2f} MB/s ({t_all:.2f} s), "
          f"redactions {dict(+s_all.redactions)}")
    print(f"ours + decontamination (the stage's default), full corpus: {mb_all / t_decon:7.2f} MB/s "
          f"({t_decon:.2f} s)")
    print(f"ours, sample:        {mb / t_ours:7.2f} MB/s ({t_ours:.2f} s)")
    print(f"detect-secrets:      {mb / t_ds:7.2f} MB/s ({t_ds:.2f} s), findings {ds_found}")
    print(f"ratio ours / detect-secrets on the same sample: {ratio:.0f}x")

    kinds, keep = corpus_scores()
    print(f"\nlabelled corpus (tests/secrets_corpus.py): {len(POSITIVES)} secrets and PII, "
          f"{keep['texts']} must-keep texts")
    print(f"  {'kind':26s} {'cases':>5s} {'recall':>7s} {'precision':>9s} {'detect-secrets':>15s}")
    for kind, row in sorted(kinds.items()):
        print(f"  {kind:26s} {row['cases']:5d} {row['recall']:7.1%} {row['precision']:9.1%} "
              f"{row['detect_secrets_recall']:15.1%}")
    print(f"  must-keep texts unchanged: ours {keep['ours_kept']:.1%}, "
          f"detect-secrets reports nothing on {keep['detect_secrets_kept']:.1%}")

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "corpus_mb": round(mb_all, 3), "sample_mb": round(mb, 3),
        "ours_mb_per_s_full": round(mb_all / t_all, 3),
        "ours_decontaminate_mb_per_s_full": round(mb_all / t_decon, 3),
        "ours_mb_per_s_sample": round(mb / t_ours, 3),
        "detect_secrets_mb_per_s": round(mb / t_ds, 3), "ratio": round(ratio, 1),
        "corpus": {"kinds": kinds, "keep": keep}}, indent=2) + "\n")
    if min(r["recall"] for r in kinds.values()) < 0.99 or keep["ours_kept"] < 1:
        sys.exit(1)


if __name__ == "__main__":
    main()
