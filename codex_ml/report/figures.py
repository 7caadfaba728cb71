"""PNG figures with matplotlib's Agg backend (no display, no network). Each returns False when its
data is missing, so the report says "not available" instead."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# transformers' DVCLiveCallback logs the running train loss as "loss", validation as "eval/loss",
# and the Trainer's end-of-run average as "train/loss" (one point).
LABELS = {"loss": "train", "eval/loss": "validation", "train/loss": "train, run mean",
          "learning_rate": "learning rate", "tokens_per_s": "tokens/s"}
COLORS = {"model": "#3b6fb6", "gzip -9": "#9a9a9a", "xz -9": "#6b6b6b"}


def _save(fig, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def training_curves(curves: dict, path: Path) -> bool:
    """Loss (train and val), learning rate, tokens/s against optimizer step."""
    panels = [("loss (nats/token)", [k for k in curves if k.endswith("loss")]),
              ("learning rate", [k for k in curves if "learning_rate" in k or k.endswith("/lr")]),
              ("tokens/s", [k for k in curves if "tokens_per_s" in k])]
    panels = [(t, ks) for t, ks in panels if ks]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for k in sorted(keys):
            xs, ys = zip(*curves[k]) if curves[k] else ((), ())
            ax.plot(xs, ys, marker="o" if len(xs) < 15 else None, ms=3, label=LABELS.get(k, k))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    return _save(fig, path)


def bits_per_byte(ev: dict, path: Path) -> bool:
    """The model next to gzip and xz on the same documents, with 95% bootstrap intervals."""
    if not ev or "bits_per_byte" not in ev:
        return False
    base = ev.get("baselines", {})
    bars = [("model", ev["bits_per_byte"]), ("gzip -9", base.get("gzip_bits_per_byte")),
            ("xz -9", base.get("xz_bits_per_byte"))]
    bars = [(n, b) for n, b in bars if b]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    vals = [b["value"] for _, b in bars]
    err = [[b["value"] - b["ci_low"] for _, b in bars], [b["ci_high"] - b["value"] for _, b in bars]]
    ax.bar([n for n, _ in bars], vals, yerr=err, capsize=6, color=[COLORS[n] for n, _ in bars])
    for i, v in enumerate(vals):
        ax.text(i, v / 2, f"{v:.3f}", ha="center", color="white", fontsize=10, fontweight="bold")
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title(f"Test split, {ev.get('docs', '?')} documents, 95% bootstrap CI", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def per_document(docs, path: Path) -> bool:
    """Each test document's model bits/byte against gzip's: points below the diagonal beat gzip."""
    if docs is None or len(docs) == 0 or "gzip_bits" not in docs:
        return False
    g = docs["gzip_bits"] / docs["bytes"].clip(lower=1)
    m = docs["nll_bits"] / docs["bytes"].clip(lower=1)
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    sc = ax.scatter(g, m, s=12 + 60 * docs["bytes"] / docs["bytes"].max(), c=COLORS["model"], alpha=0.7)
    lo, hi = min(g.min(), m.min()) * 0.95, max(g.max(), m.max()) * 1.05
    ax.plot([lo, hi], [lo, hi], color="#888", lw=1, ls="--", label="model = gzip")
    ax.set_xlabel("gzip -9 bits/byte")
    ax.set_ylabel("model bits/byte")
    ax.set_title("Per document (size = bytes)", fontsize=10)
    ax.legend(handles=[sc, ax.lines[0]], labels=["document", "model = gzip"], fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)
