"""Tables for the several-GPU runs from the train stage's own logs (bench/gpu_ddp.sh, gpu_final.sh):
steady tokens/s (median over logged intervals after the first two) and the loss curves at equal
global batch.

    python bench/ddp_summary.py bench/results/2026-11-29-s2
"""

import ast
import json
import re
import statistics
import sys
from pathlib import Path


def curve(log: Path) -> list[tuple[int, float, float | None]]:
    """(step, loss, tokens/s) per train log line: the loop's `step N/M {json}` lines, or (older
    logs) the HF Trainer's dicts, which it printed at step 1, then every 10."""
    lines = log.read_text().splitlines()
    own = [re.search(r"step (\d+)/\d+ (\{.*\})$", line) for line in lines]
    own = [(int(m.group(1)), json.loads(m.group(2))) for m in own if m]
    if own:
        return [(s, float(r["loss"]), r.get("tokens_per_s")) for s, r in own if "loss" in r]
    rows = [ast.literal_eval(line) for line in lines if line.startswith("{'loss'")]
    steps = [1] + [10 * i for i in range(1, len(rows))]
    return [(s, float(r["loss"]), float(r["tokens_per_s"]) if "tokens_per_s" in r else None)
            for s, r in zip(steps, rows)]


def steady(c) -> float:
    return statistics.median(t for _, _, t in c[2:] if t)


def main() -> None:
    d = Path(sys.argv[1])
    runs = {p.stem.replace("_log", ""): curve(p) for p in sorted(d.glob("*_log_g*.txt"))}
    print("| run | steady tokens/s | loss @ 300 |\n|---|---:|---:|")
    for name, c in runs.items():
        print(f"| {name} | {steady(c):,.0f} | {c[-1][1]:.3f} |")
    for call in ("call1", "call3"):
        g1, g2 = runs.get(f"{call}_g1_b16"), runs.get(f"{call}_g2_b16")
        if g1 and g2:
            print(f"{call}: 2 GPUs / 1 GPU at 16 x 1024 per GPU = {steady(g2) / steady(g1):.2f}x")
    g1, bk = runs.get("call3_g1_b16"), runs.get("call3_g2_b16_bk100")
    if g1 and bk:
        print(f"call3, 100 MB buckets: {steady(bk) / steady(g1):.2f}x")
    a, b = runs.get("call1_g1_b32"), runs.get("call1_g2_b16")
    if a and b:
        gap = [abs(x[1] - y[1]) for x, y in zip(a, b) if x[0] >= 150]
        print(f"global batch 32, 1 x 32 vs 2 x 16: mean |loss gap| over steps 150-300 = "
              f"{statistics.mean(gap):.3f}, max {max(gap):.3f}; final {a[-1][1]:.3f} vs {b[-1][1]:.3f}")


if __name__ == "__main__":
    main()
