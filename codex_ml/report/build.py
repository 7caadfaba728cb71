"""Assemble the report: Markdown sections from the gathered inputs, figures beside it, and an HTML
page with the figures embedded (one file that opens anywhere, offline)."""

from __future__ import annotations

import base64
import datetime as dt
import html
import math
import re
from pathlib import Path

from . import figures, paired

NA = "_not available_"
# How to read a change, by metric name: True = higher is better, False = lower is better.
HIGHER = ("accuracy", "exact_match", "edit_similarity", "bleu", "chrf", "rougel", "tokens_per_s",
          "tokens_per_second", "bytes_per_token", "roundtrip_exact", "hf_sp_identical")
LOWER = ("loss", "perplexity", "bits_per_byte", "byte_fallback_share", "seconds", "wall_s")
NEUTRAL_PREFIX = ("baselines.", "setup.", "docs", "bytes", "tokens")  # describe the data, not quality


def direction(key: str) -> bool | None:
    k = key.lower()
    if k.startswith(NEUTRAL_PREFIX) and not k.startswith("tokens_per"):
        return None
    if any(h in k for h in HIGHER):
        return True
    if any(h in k for h in LOWER):
        return False
    return None


def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:,.4f}".rstrip("0").rstrip(".") if abs(v) < 1000 else f"{v:,.1f}"
    return str(v)


def cell(v) -> str:
    return fmt(v).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list]) -> str:
    if not rows:
        return NA + "\n"
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def flatten(d, prefix="") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def ci(m: dict | None, scale: float = 1.0) -> list:
    if not m:
        return ["–", "–"]
    return [m["value"] * scale, f"[{fmt(m['ci_low'] * scale)}, {fmt(m['ci_high'] * scale)}]"]


# ---------------------------------------------------------------- sections
def summary(c: dict) -> str:
    ev = c["eval"]
    if not ev:
        return "Evaluation results are not available yet (metrics/eval.json missing).\n"
    b, base = ev["bits_per_byte"], ev.get("baselines", {})
    g, x = base.get("gzip_bits_per_byte"), base.get("xz_bits_per_byte")
    line = (f"On the test split ({fmt(ev['docs'])} documents, {fmt(ev['bytes'])} bytes) the model needs "
            f"**{b['value']:.3f} bits per byte** (95% CI {b['ci_low']:.3f}–{b['ci_high']:.3f})")
    if g and x:
        best = min(g["value"], x["value"])
        verdict = ("better than both compressors" if b["ci_high"] < best else
                   "worse than both compressors" if b["ci_low"] > max(g["value"], x["value"]) else
                   "not clearly better than the compressors")
        line += (f"; gzip -9 needs {g['value']:.3f} and xz -9 {x['value']:.3f} on the same files: "
                 f"the model is **{verdict}**.")
    return line + "\n"


def data_section(c: dict) -> str:
    ing, san, spl, man = c["ingest"], c["sanitize"], c["split"], c["manifest"]
    rows = []
    if ing:
        rows.append(["ingest (read)", ing.get("documents"), ing.get("bytes")])
    if san:
        rows.append(["sanitize (kept)", san.get("docs_out"), san.get("bytes_out")])
    splits = (spl or {}) if spl and "train" in spl else (man or {}).get("splits", {})
    for name in ("train", "val", "test"):
        if name in splits:
            rows.append([f"split: {name}", splits[name].get("documents"), splits[name].get("bytes")])
    version = (spl or {}).get("dataset_version") or (man or {}).get("dataset_version")
    out = [f"Dataset version: `{version}`\n" if version else f"Dataset version: {NA}\n",
           "\n### Documents and bytes through the stages\n\n", table(["stage", "documents", "bytes"], rows)]
    sources = (ing or {}).get("sources") or {}
    if len(sources) > 1:
        out.append("\nBy source:\n\n" + table(
            ["source", "kind", "documents", "bytes"],
            [[k, v.get("kind"), v.get("documents"), v.get("bytes")] for k, v in sources.items()]))

    def reasons(title, d, what):
        nonzero = sorted(((k, v) for k, v in (d or {}).items() if v), key=lambda kv: -kv[1])
        out.append(f"\n### {title}\n\n")
        if d is None:
            out.append(NA + "\n")
        elif not nonzero:
            out.append(f"None ({len(d)} {what} checked, all zero).\n")
        else:
            out.append(table([what.rstrip("s"), "count"], [list(kv) for kv in nonzero]))
            zero = [k for k, v in d.items() if not v]
            if zero:
                out.append(f"\nZero: {', '.join(sorted(zero))}.\n")

    reasons("Skipped at ingest, by reason", (ing or {}).get("skipped") if ing else None, "reasons")
    reasons("Dropped at sanitize, by reason", (san or {}).get("dropped") if san else None, "reasons")
    reasons("Redactions, by rule", (san or {}).get("redactions") if san else None, "rules")
    if san and "docs_redacted" in san:
        out.append(f"\n{fmt(san['docs_redacted'])} documents had at least one redaction "
                   f"({fmt(san.get('redactions_total'))} in all).\n")
    return "".join(out)


def kv_section(d: dict | None, keys: list[str] | None = None) -> str:
    if not d:
        return NA + "\n"
    flat = flatten(d)
    keys = [k for k in (keys or flat) if k in flat]
    return table(["field", "value"], [[k, flat[k]] for k in keys])


TOKENIZER_KEYS = ["source", "model_type", "vocab_size", "val_bytes_per_token", "test_bytes_per_token",
                  "roundtrip_exact", "hf_sp_identical", "byte_fallback_share", "train_chunks",
                  "train_seconds", "base"]
TRAIN_KEYS = ["steps", "tokens", "tokens_per_s", "final_train_loss", "final_val_loss", "best_val_loss",
              "params", "trainable_params", "precision", "world_size", "resumed_from_step",
              "stopped_early", "train_wall_s", "wall_s"]


def training_section(c: dict, fig_dir: Path) -> str:
    out = [kv_section(c["train"], TRAIN_KEYS)]
    steps = (c["train"] or {}).get("steps")
    last = max((s for series in c["curves"].values() for s, _ in series), default=None)
    if steps is not None and last is not None and last != steps:
        # The engine evaluates at its last step, so this run's series end there; others are
        # another run's (seen: a GPU run without dvclive left the CPU run's curves in place).
        out.append(f"\nTraining curves: {NA} (the series in {c['paths'].train_live} end at step "
                   f"{last:,.0f}, but this model trained {steps:,} steps: not this run's).\n")
    elif figures.training_curves(c["curves"], fig_dir / "training.png"):
        out.append("\n![Training curves](figures/training.png)\n")
    else:
        out.append(f"\nTraining curves: {NA} (no DVCLive series in {c['paths'].train_live}).\n")
    return "".join(out)


def eval_section(c: dict, fig_dir: Path) -> str:
    ev = c["eval"]
    if not ev:
        return NA + " (metrics/eval.json missing).\n"
    base = ev.get("baselines", {})
    rows = [["bits per byte", *ci(ev.get("bits_per_byte")), "lower"],
            ["  gzip -9 (same documents)", *ci(base.get("gzip_bits_per_byte")), "lower"],
            ["  xz -9 (same documents)", *ci(base.get("xz_bits_per_byte")), "lower"],
            ["loss (nats/token)", *ci(ev.get("loss")), "lower"],
            ["perplexity", *ci(ev.get("perplexity")), "lower"],
            ["top-1 next-token accuracy", *ci(ev.get("top1_accuracy")), "higher"],
            ["top-5 next-token accuracy", *ci(ev.get("top5_accuracy")), "higher"]]
    s = ev.get("setup", {})
    out = [table(["metric", "value", "95% CI", "better"], rows),
           f"\n{fmt(ev.get('docs'))} documents, {fmt(ev.get('bytes'))} bytes, {fmt(ev.get('tokens'))} "
           f"tokens ({fmt(ev.get('bytes_per_token'))} bytes/token); windows of {fmt(s.get('context'))} "
           f"tokens advancing by {fmt(s.get('stride'))}; intervals from {fmt(s.get('bootstrap'))} "
           "bootstrap resamples of documents.\n"]
    if figures.bits_per_byte(ev, fig_dir / "bits_per_byte.png"):
        out.append("\n![Bits per byte: model, gzip, xz](figures/bits_per_byte.png)")
    if figures.per_document(c["docs"], fig_dir / "per_document.png"):
        out.append(" ![Per-document bits per byte](figures/per_document.png)")
    out.append("\n")
    comp = ev.get("completion") or {}
    out.append(f"\n### Code completion ({fmt(comp.get('samples', 0))} prompts, greedy)\n")
    names = {"exact_match_line": "exact match, next line", "edit_similarity_line": "edit similarity, next line",
             "edit_similarity": "edit similarity, continuation", "bleu": "BLEU (sacrebleu, 0-100)",
             "chrf": "chrF (sacrebleu, 0-100)", "rougeL": "ROUGE-L F"}
    crow = []
    for k, label in names.items():
        if k in comp:
            v = comp[k]
            crow.append([label, *(ci(v) if isinstance(v, dict) else [v, "–"])])
    out.append(table(["metric", "value", "95% CI"], crow))
    return "".join(out)


def _tail(text: str, lines: int) -> str:
    parts = text.splitlines()
    return ("…\n" if len(parts) > lines else "") + "\n".join(parts[-lines:])


def fence(text: str) -> str:
    ticks = "`" * max(3, max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    return f"{ticks}python\n{text.rstrip()}\n{ticks}\n"


def samples_section(c: dict) -> str:
    samples = c["samples"]
    if not samples:
        return NA + " (data/eval/predictions.jsonl missing or empty).\n"
    out = []
    for i, s in enumerate(samples, 1):
        sc = s.get("scores", {})
        out.append(f"\n\n**{i}. `{s.get('path')}`**: exact line {fmt(sc.get('exact_match_line'))}, "
                   f"edit similarity {fmt(sc.get('edit_similarity'))}, chrF {fmt(sc.get('chrf'))}\n\n")
        out.append("Prompt (last lines):\n\n" + fence(_tail(s.get("prompt", ""), 6)))
        out.append("\nModel:\n\n" + fence(s.get("prediction", "") or "(empty)"))
        out.append("\nTruth:\n\n" + fence(s.get("reference", "")))
    return "".join(out)


def provenance_section(c: dict) -> str:
    return kv_section(c["provenance"])


def comparison_section(c: dict) -> str:
    ref = c["compare_to"]
    rows, missing = [], []
    for name, old in c["committed"].items():
        new = c.get(name)
        if old is None or new is None:
            missing.append(f"metrics/{name}.json")
            continue
        fo, fn = flatten(old), flatten(new)
        for k in fn:
            if k.endswith((".ci_low", ".ci_high")) or k.startswith(("setup.", "timing.")):
                continue
            a, b = fo.get(k), fn[k]
            if not isinstance(b, (int, float)) or isinstance(b, bool):
                continue
            label = f"{name}: {k.removesuffix('.value')}"
            if not isinstance(a, (int, float)) or isinstance(a, bool):
                rows.append([label, "–", b, "–", "new"])
                continue
            d = direction(k)
            if math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12):
                verdict = "same"
            elif d is None:
                verdict = "changed"
            else:
                verdict = "**better**" if (b > a) == d else "**worse**"
            arrow = "↑" if d else "↓" if d is False else ""
            rel = f" ({(b - a) / abs(a):+.1%})" if a else ""
            change = "–" if verdict == "same" else f"{b - a:+.4g}{rel}"
            rows.append([label + (f" {arrow}" if arrow else ""), a, b, change, verdict])
    out = [f"Against `{ref}` (↑ higher is better, ↓ lower is better; counts and timings are neutral).\n\n"]
    out.append(table(["metric", ref, "now", "change", "verdict"], rows) if rows else
               f"{NA}: no committed metrics at `{ref}` to compare with.\n")
    if missing and rows:
        out.append(f"\nNot compared (missing at `{ref}` or now): {', '.join(missing)}.\n")
    out.append(paired.section(c.get("eval_docs"), c.get("committed_docs"), ref, seed=0))
    return "".join(out)


def markdown(c: dict, fig_dir: Path) -> str:
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"# codex-pipeline report\n\nGenerated {when} at git `{c.get('commit') or 'unknown'}`.\n\n",
             summary(c),
             "\n## Data\n\n", data_section(c),
             "\n## Tokenizer\n\n", kv_section(c["tokenizer"], TOKENIZER_KEYS),
             "\n## Training\n\n", training_section(c, fig_dir),
             "\n## Evaluation\n\n", eval_section(c, fig_dir),
             "\n## Sample completions\n\n", samples_section(c),
             "\n## Provenance\n\n", provenance_section(c),
             f"\n## Comparison with the last commit\n\n", comparison_section(c)]
    return "".join(parts)


CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:980px;margin:2em auto;
padding:0 1em;color:#222}
h1{border-bottom:2px solid #3b6fb6;padding-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:14px}th,td{border:1px solid #ddd;padding:3px 9px;
text-align:left}th{background:#f2f5fa}tr:nth-child(even) td{background:#fafafa}
td:nth-child(n+2){font-variant-numeric:tabular-nums}
pre{background:#f6f8fa;padding:.6em;overflow-x:auto;font-size:13px;border-radius:4px}
code{font-family:ui-monospace,Menlo,Consolas,monospace}img{max-width:100%;margin:.3em 0}
"""


def to_html(md: str, fig_dir: Path) -> str:
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(md)

    def embed(m):
        f = fig_dir / m.group(1)
        if not f.exists():
            return m.group(0)
        return 'src="data:image/png;base64,' + base64.b64encode(f.read_bytes()).decode() + '"'

    body = re.sub(r'src="figures/([^"]+)"', embed, body)
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{html.escape('codex-pipeline report')}</title><style>{CSS}</style></head>"
            f"<body>\n{body}</body></html>\n")


def build(c: dict, out_dir: Path) -> dict:
    """Write report.md, report.html and figures/ into out_dir; return what was available."""
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    md = markdown(c, fig_dir)
    (out_dir / "report.md").write_text(md)
    (out_dir / "report.html").write_text(to_html(md, fig_dir))
    available = {k: c.get(k) is not None for k in
                 ("ingest", "sanitize", "split", "manifest", "tokenizer", "train", "eval", "provenance")}
    available["curves"] = bool(c["curves"])
    available["samples"] = bool(c["samples"])
    available["committed"] = any(v is not None for v in c["committed"].values())
    return {"sections_available": available, "figures": sorted(p.name for p in fig_dir.glob("*.png")),
            "not_available": md.count(NA)}
