"""Sanitize throughput (MB/s) against detect-secrets on the same input, in the same run.

    .venv/bin/python bench/bench_sanitize.py [--sample-mb 2] [--rounds 3]

Input: the running Python's standard library .py files without tests (~11 MB). detect-secrets is
about a hundred times slower, so both sides are timed on the same spread sample of those files
(every k-th file up to --sample-mb); ours is also timed on the whole corpus. detect-secrets runs
through its Python API with its default plugins and filters (`default_settings()`,
`SecretsCollection.scan_file`) over the very same lines, written to temporary files. Ours is the
whole per-document sanitizer (quality filters, policy, redaction, dedup) with the default policy.
A recall table shows, for one synthetic example of every kind, which side catches it.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codex_ml.params import Sanitize  # noqa: E402
from codex_ml.safety.sanitize import Sanitizer  # noqa: E402

SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages", "dist-packages",
             "__pycache__"}

# One synthetic example per kind the issue lists (fake values in the real formats).
A = "aB3dE5fG7hJ9kL2mN4pQ6rS8tU1vW3xY5zA7bC9dE2fG4hJ6kL8mN1pQ3rS5tU7vW9xY2zA4bC6dE8fG1hJ3kL5mN7p"
KINDS = {
    "aws_access_key": "aws_access_key_id = AKIAY3FQ7ZJ2KXW4NB6M",
    "aws_secret_key": "aws_secret_access_key = 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",
    "google_api_key": "GOOGLE_KEY = 'AIzaSyD8x" + A[:30] + "'",
    "azure_storage_key": "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=" + A[:86] + "==",
    "github_token": "GH_TOKEN = 'ghp_" + A[:36] + "'",
    "github_fine_grained_token": "token = github_pat_" + A[:22] + "_" + A[22:81],
    "gitlab_token": "GITLAB = 'glpat-" + A[:20] + "'",
    "npm_token": "//registry.npmjs.org/:_authToken=npm_" + A[:36],
    "pypi_token": "password = pypi-AgEIcHlwaS5vcmc" + A[:70],
    "slack_token": "SLACK = 'xoxb-123456789012-1234567890123-" + A[:24] + "'",
    "slack_webhook": "hook = 'https://hooks.slack.com/services/T0ABCDEF1/B0ABCDEF2/" + A[:24] + "'",
    "stripe_key": "stripe.api_key = 'sk_live_" + A[:24] + "'",
    "sendgrid_key": "SENDGRID = 'SG." + A[:22] + "." + A[22:65] + "'",
    "twilio_key": "TWILIO_KEY = 'SK" + "3f9a" * 8 + "'",
    "openai_key": "OPENAI_API_KEY = 'sk-proj-" + A[:48] + "'",
    "anthropic_key": "ANTHROPIC_API_KEY = 'sk-ant-api03-" + A[:93] + "AA'",
    "huggingface_token": "HF_TOKEN = 'hf_" + A[:34] + "'",
    "jwt": "t = 'eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
           "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U'",
    "bearer_token": "headers = {'Authorization': 'Bearer 7f3k9" + A[:40] + "'}",
    "private_key": "-----BEGIN RSA PRIVATE KEY-----\n" + A[:64] + "\n" + A[1:65]
                   + "\n-----END RSA PRIVATE KEY-----",
    "url_password": "DATABASE_URL = 'postgres://admin:Zq8vT2pLx@db.prod.acme.io:5432/app'",
    "secret_assignment": "password = 'hunter22'",
    "email": "maintainer = 'jane.doe@acme-corp.io'",
    "phone": "phone = '+1 (415) 867-5309'",
    "ip_address": "SERVER = '93.184.216.34'",
    "credit_card": "card = '4556 7375 8689 9855'",
    "ssn": "ssn = '536-22-8765'",
}


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


def ours(docs, rounds: int) -> tuple[float, Sanitizer]:
    """Best-of-`rounds` seconds for the whole per-document sanitizer."""
    best = float("inf")
    for _ in range(rounds):
        s = Sanitizer(Sanitize())
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


def recall_table() -> dict:
    from detect_secrets import SecretsCollection
    from detect_secrets.settings import default_settings

    s = Sanitizer(Sanitize(min_chars=0, dedup=False))
    rows = {}
    with tempfile.TemporaryDirectory() as d, default_settings():
        for kind, text in KINDS.items():
            out = s({"id": "", "source": "b", "path": "x.py", "lang": "python", "text": text + "\n",
                     "bytes": None})
            ours_hit = out is not None and s.redactions[kind] > 0 and out["text"] != text + "\n"
            p = os.path.join(d, f"{kind}.py")
            Path(p).write_text(text + "\n")
            coll = SecretsCollection()
            coll.scan_file(p)
            rows[kind] = (ours_hit, sorted({sec.type for _, sec in coll}))
    return rows


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
    t_ours, _ = ours(sample, args.rounds)
    t_ds, ds_found = detect_secrets_scan(sample)
    ratio = (mb / t_ours) / (mb / t_ds)
    print(f"ours, full corpus:   {mb_all / t_all:7.2f} MB/s ({t_all:.2f} s), "
          f"redactions {dict(+s_all.redactions)}")
    print(f"ours, sample:        {mb / t_ours:7.2f} MB/s ({t_ours:.2f} s)")
    print(f"detect-secrets:      {mb / t_ds:7.2f} MB/s ({t_ds:.2f} s), findings {ds_found}")
    print(f"ratio ours / detect-secrets on the same sample: {ratio:.0f}x")

    rows = recall_table()
    caught = sum(hit for hit, _ in rows.values())
    print(f"\nrecall on one example per kind: ours {caught}/{len(rows)}, detect-secrets "
          f"{sum(bool(ds) for _, ds in rows.values())}/{len(rows)}")
    for kind, (hit, ds) in rows.items():
        print(f"  {kind:26s} ours={'yes' if hit else 'NO '}  detect-secrets={', '.join(ds) or '-'}")

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "corpus_mb": round(mb_all, 3), "sample_mb": round(mb, 3),
        "ours_mb_per_s_full": round(mb_all / t_all, 3), "ours_mb_per_s_sample": round(mb / t_ours, 3),
        "detect_secrets_mb_per_s": round(mb / t_ds, 3), "ratio": round(ratio, 1),
        "recall_ours": caught, "kinds": len(rows)}, indent=2) + "\n")
    if caught < len(rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
