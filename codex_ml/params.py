"""Typed schema of params.yaml. `load()` validates the file before a stage does anything.

Every group forbids unknown keys; a bad value raises UserError naming the key path, the value and
what is allowed, e.g. `params.yaml: train.lr = -1.0: must be > 0`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from .stage import UserError

PARAMS_FILE = "params.yaml"


# YAML 1.1 reads a bare `on`/`off` as true/false; accept both spellings.
OnOff = Annotated[Literal["auto", "on", "off"],
                  BeforeValidator(lambda v: ("on" if v else "off") if isinstance(v, bool) else v)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- ingest
DEFAULT_STDLIB_EXCLUDE = ["site-packages/**", "dist-packages/**", "test/**", "**/test/**",
                          "**/tests/**", "**/idle_test/**", "idlelib/**", "lib2to3/**",
                          "**/__pycache__/**", "config-*/**"]


class StdlibSource(Strict):
    """The running Python's standard library, or with python-site-packages its installed packages
    (the current environment's purelib): offline corpora every machine has."""
    kind: Literal["python-stdlib", "python-site-packages"]
    name: str = "stdlib"
    include: list[str] = ["**/*.py"]
    exclude: list[str] = DEFAULT_STDLIB_EXCLUDE


class DirectorySource(Strict):
    kind: Literal["directory"]
    name: str
    path: str
    include: list[str] = ["**/*.py"]
    exclude: list[str] = []
    follow_symlinks: bool = True


class TableSource(Strict):
    kind: Literal["jsonl", "csv", "parquet"]
    name: str
    path: str
    text_column: str = "text"
    path_column: str | None = None  # column giving each row's relative path (language comes from it)
    lang: str | None = None         # language for all rows when there is no path column


class HFDatasetSource(Strict):
    """A Hugging Face `datasets` source; needs a network (or a warm HF cache)."""
    kind: Literal["hf-dataset"]
    name: str
    dataset: str
    config: str | None = None
    split: str = "train"
    text_column: str = "content"
    path_column: str | None = None
    max_rows: int | None = Field(None, gt=0)


Source = Annotated[Union[StdlibSource, DirectorySource, TableSource, HFDatasetSource],
                   Field(discriminator="kind")]


class Ingest(Strict):
    sources: list[Source] = Field(default_factory=lambda: [StdlibSource(kind="python-stdlib")],
                                  min_length=1)
    max_file_bytes: int = Field(1_000_000, gt=0)
    shard_bytes: int = Field(256 << 20, ge=1 << 20)

    @model_validator(mode="after")
    def _unique_names(self):
        names = [s.name for s in self.sources]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"source names must be unique, repeated: {sorted(dup)}")
        return self


# ---------------------------------------------------------------- sanitize
class NearDup(Strict):
    enabled: bool = False
    threshold: float = Field(0.85, gt=0, le=1)
    num_perm: int = Field(128, ge=16, le=1024)
    shingle_size: int = Field(5, ge=1, le=64)


class Decontaminate(Strict):
    """Drop documents holding a benchmark's problems (codex_ml/safety/decontam.py): at least
    `threshold` of one item's normalised `ngram`-grams (its prompt, its solution, or both)."""
    enabled: bool = True
    benchmarks: list[Literal["humaneval"]] = Field(["humaneval"], min_length=1)
    ngram: int = Field(8, ge=3, le=64)
    threshold: float = Field(0.8, gt=0, le=1)


class Sanitize(Strict):
    policy: str | None = "configs/safety_policy.yaml"
    redact_pii: bool = True
    dedup: bool = True
    near_dup: NearDup = NearDup()
    decontaminate: Decontaminate = Decontaminate()
    min_chars: int = Field(16, ge=0)
    max_line_length: int = Field(1000, gt=0)
    min_alnum_fraction: float = Field(0.25, ge=0, le=1)


# ---------------------------------------------------------------- split
class Fractions(Strict):
    train: float = Field(0.9, ge=0, le=1)
    val: float = Field(0.05, ge=0, le=1)
    test: float = Field(0.05, ge=0, le=1)

    @model_validator(mode="after")
    def _sum_to_one(self):
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        if self.train <= 0:
            raise ValueError("train fraction must be > 0")
        return self


class Split(Strict):
    fractions: Fractions = Fractions()
    group_by: Literal["id", "directory"] = "id"
    # Report (not remove) test documents with a near duplicate in train: MinHash over word
    # shingles, estimated Jaccard >= threshold. Changes no assignment and no dataset version.
    leakage: NearDup = NearDup(enabled=True)


# ---------------------------------------------------------------- data engine / tokenize
class Data(Strict):
    """Where the data stages (ingest, sanitize, split, tokenize) run. Their outputs are the same
    bytes whatever these say, so dvc.yaml lists none of them as a stage's params."""
    engine: Literal["local", "ray"] = "local"
    # Processes of the local engine (auto: every core); one runs in the stage's own process.
    workers: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"
    # A Ray cluster's address (host:port or ray://host:10001); null: the RAY_ADDRESS variable.
    ray_address: str | None = None


class Tokenize(Strict):
    # A shard closes at the first document end past this many tokens (uint16: 2 bytes a token).
    shard_tokens: int = Field(1 << 28, ge=1)


# ---------------------------------------------------------------- tokenizer
class Tokenizer(Strict):
    """SentencePiece settings; the lossless ones (identity normalisation, no whitespace collapsing,
    whitespace-only pieces, no dummy prefix) are fixed in codex_ml/tokenizer."""
    model_type: Literal["bpe", "unigram"] = "bpe"   # unigram trains ~20x slower on code
    vocab_size: int = Field(4096, ge=300, le=1_000_000)
    character_coverage: float = Field(0.9995, gt=0, le=1)  # rarer characters become byte tokens
    byte_fallback: bool = True                      # must stay true: it makes every string encodable
    split_digits: bool = True                       # numbers as single digits
    split_by_whitespace: bool = False               # false: pieces may span spaces ("\n▁▁▁▁return")
    user_defined_symbols: list[str] = []            # always one token each, never merged
    max_piece_length: int = Field(16, ge=1, le=64)  # characters
    input_sentence_size: int = Field(20_000, ge=0)  # chunks sampled (seeded); 0 = all
    max_sentence_length: int = Field(16384, ge=64)  # bytes per chunk; documents are cut at line ends
    num_threads: int = Field(2, ge=1)

    @field_validator("byte_fallback")
    @classmethod
    def _byte_fallback(cls, v):
        if not v:
            raise ValueError("must be true: without it characters outside the vocabulary become "
                             "<unk> and documents no longer round-trip")
        return v

    @field_validator("user_defined_symbols")
    @classmethod
    def _symbols(cls, v):
        for s in v:
            if not s or any(c in s for c in " \u2581\ue000\ue001\ue002"):
                raise ValueError(f"{s!r} is empty or holds a space, U+2581 or U+E000-E002 "
                                 "(reserved by the lossless encoding)")
            if s in ("<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"):
                raise ValueError(f"{s!r} is a fill-in-the-middle sentinel (a control token, "
                                 "always in the vocabulary); remove it")
        if len(set(v)) != len(v):
            raise ValueError("has duplicates")
        return v


# ---------------------------------------------------------------- model
class Lora(Strict):
    enabled: bool = False
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "v_proj"]
    bias: Literal["none", "all", "lora_only"] = "none"
    merge: bool = True  # models/model holds the merged full model; adapter/ the adapter alone


class Model(Strict):
    init: Literal["scratch", "pretrained"] = "scratch"
    base: str | None = None
    trust_remote_code: bool = False
    n_layers: int = Field(2, ge=1)
    hidden_size: int = Field(256, ge=8)
    n_heads: int = Field(8, ge=1)
    n_kv_heads: int = Field(8, ge=1)
    intermediate_size: int = Field(688, ge=8)
    rope_theta: float = Field(10000.0, gt=0)
    context_length: int = Field(256, ge=8)
    tie_embeddings: bool = True
    lora: Lora = Lora()

    @model_validator(mode="after")
    def _consistent(self):
        if self.init == "pretrained" and not self.base:
            raise ValueError("init: pretrained needs `base` (a local model directory or hub id)")
        if self.init == "scratch" and self.base:
            raise ValueError("`base` is only used with init: pretrained")
        if self.init == "scratch" and self.lora.enabled:
            raise ValueError("LoRA needs a pretrained base (init: pretrained); "
                             "a scratch model trains all weights")
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} must be divisible by n_kv_heads {self.n_kv_heads}")
        return self


# ---------------------------------------------------------------- train
class Fim(Strict):
    """Fill-in-the-middle (codex_ml/training/fim.py): each training document of a block is, with
    probability `rate`, cut at two random characters into prefix/middle/suffix and reordered
    with the sentinels, as SPM with probability `spm_rate`, else PSM (StarCoder: 0.5 and 0.5).
    rate 0 trains exactly as without FIM. Val loss stays left-to-right."""
    rate: float = Field(0.5, ge=0, le=1)
    spm_rate: float = Field(0.5, ge=0, le=1)


class Engine(Strict):
    """The training engine's speed levers (codex_ml/training/transforms.py, docs/engine.md). auto:
    on where it was measured to help (a CUDA GPU, the model types it supports), off elsewhere;
    `on` where it cannot apply is an error naming why. None changes what is computed beyond
    rounding; each can be turned off to measure it (bench/bench_train_gpu.py)."""
    compile: OnOff = "auto"      # torch.compile of the step's forward and backward (auto: on a GPU)
    # auto = reduce-overhead (CUDA graphs) on a GPU without FSDP or gradient accumulation
    compile_mode: Literal["auto", "default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = "auto"
    attention: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"  # SDPA kernel tried first
    causal_attention: OnOff = "auto"   # SDPA with is_causal and no mask (full-attention decoders)
    rope_table: OnOff = "auto"         # rotary cos/sin read from a table made once
    # the training loss: fused = linear cross-entropy making its gradient in the forward pass
    # (codex_ml/training/fused_ce.py; auto: on a GPU, Llama-style heads), model = the model's own
    loss: Literal["auto", "fused", "model"] = "auto"
    bf16_residual: OnOff = "auto"      # the residual stream in bf16 under bf16 autocast
    fused_proj: Literal["auto", "off", "qkv", "all"] = "auto"  # q/k/v (and gate/up) as one matmul
    bf16_weights: OnOff = "auto"       # matmuls read a bf16 copy of the weights the optimizer writes
    fused_adamw: OnOff = "auto"        # AdamW as one Triton kernel that also writes the bf16 copies
    fused_clip: OnOff = "auto"         # gradient clipping as the fused optimizer's grad_scale
    cublas_workspace: OnOff = "auto"   # off: no cuBLAS workspace (auto: off under CUDA graphs, sm_90)
    deferred_logs: OnOff = "auto"      # log values copied to the host without waiting for the GPU


class Train(Strict):
    block_size: int = Field(256, ge=8)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(6e-3, gt=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(50, ge=0)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup",
                       "cosine_with_min_lr", "polynomial"] = "cosine"
    # The default profile: ~2.3M tokens (1,100 steps of 8 x 256) in minutes on a 2-core CPU.
    max_steps: int = Field(1100, ge=1)
    max_grad_norm: float = Field(1.0, ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # Wall-clock budget: stop (evaluate and save) after this many seconds even before max_steps.
    max_time_s: float | None = Field(None, gt=0)
    eval_every: int = Field(100, ge=1)
    eval_batches: int = Field(16, ge=1)
    early_stopping_patience: int = Field(0, ge=0)  # 0 disables
    save_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    devices: Literal["auto"] | int = "auto"
    distributed: Literal["ddp", "fsdp"] = "ddp"
    # DDP gradient bucket size in MB (torch's default is 25). Under torch.compile each bucket
    # boundary also splits the compiled graph: fewer, larger buckets scaled better on 2 GPUs
    # (bench/RESULTS_GPU.md).
    ddp_bucket_mb: int = Field(100, ge=1)
    # The dtype DDP all-reduces gradients in: bf16 sends half the bytes (the weights and the
    # optimizer stay fp32). DDP only.
    ddp_allreduce: Literal["fp32", "bf16"] = "fp32"
    num_workers: int = Field(0, ge=0)
    # Experiment trackers besides dvclive (rank 0, local files under the live directory):
    # tensorboard (event files in <live>/tensorboard), mlflow (a file store in <live>/mlruns).
    report_to: list[Literal["tensorboard", "mlflow"]] = []
    fim: Fim = Fim()
    engine: Engine = Engine()

    @model_validator(mode="after")
    def _ddp_only(self):
        if self.ddp_allreduce != "fp32" and self.distributed != "ddp":
            raise ValueError(f"ddp_allreduce: {self.ddp_allreduce} applies to distributed: ddp, "
                             f"not {self.distributed}; use fp32")
        return self


# ---------------------------------------------------------------- eval / report
class Completion(Strict):
    num_prompts: int = Field(32, ge=0)
    prompt_lines: int = Field(8, ge=1)
    max_new_tokens: int = Field(48, ge=1)


class Infill(Strict):
    """Single-line infilling (codex_ml/evaluation/infill.py): one hidden line per document, PSM
    prompt, greedy; skipped for a model trained without FIM."""
    num_docs: int = Field(32, ge=0)              # the first N test documents; 0: off
    max_new_tokens: int = Field(32, ge=1)


class HumanEval(Strict):
    """HumanEval pass@k, the generated code run in codex_ml/evaluation/sandbox.py. Off unless a
    params file turns it on: it executes model output (sandboxed; refused where no sandbox)."""
    enabled: bool = False
    problems: int | None = Field(None, ge=1, le=164)  # the first N problems; None: all 164
    num_samples: int = Field(10, ge=1)           # per problem; pass@k is reported for k <= this
    temperature: float = Field(0.8, ge=0)        # 0: greedy (then num_samples must be 1)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(256, ge=1)
    timeout_s: float = Field(3.0, gt=0, le=120)  # wall clock per sample (CPU limit the same)

    @model_validator(mode="after")
    def _greedy_once(self):
        if self.temperature == 0 and self.num_samples > 1:
            raise ValueError(f"temperature 0 is greedy decoding: its {self.num_samples} samples "
                             "would be identical; use num_samples: 1 or a temperature > 0")
        return self


class Eval(Strict):
    batch_size: int = Field(8, ge=1)             # windows (of `context` tokens) per forward pass
    bootstrap: int = Field(1000, ge=10)          # resamples of test documents for the 95% CIs
    max_docs: int | None = Field(None, ge=1)     # cap on test documents (None: the whole split)
    context: int | None = Field(None, ge=8)      # window length; None: the model's max positions
    stride: int | None = Field(None, ge=1)       # window advance; None: half the context
    completion: Completion = Completion()
    infill: Infill = Infill()
    humaneval: HumanEval = HumanEval()

    @model_validator(mode="after")
    def _stride_fits(self):
        if self.context and self.stride and self.stride > self.context:
            raise ValueError(f"stride {self.stride} must be <= context {self.context} "
                             "(else some tokens would never be scored)")
        return self


class Report(Strict):
    compare_to: str = "HEAD"
    num_samples: int = Field(5, ge=0)


class Params(Strict):
    seed: int = Field(1337, ge=0, lt=2**32)
    ingest: Ingest = Ingest()
    sanitize: Sanitize = Sanitize()
    split: Split = Split()
    data: Data = Data()
    tokenizer: Tokenizer = Tokenizer()
    tokenize: Tokenize = Tokenize()
    model: Model = Model()
    train: Train = Train()
    eval: Eval = Eval()
    report: Report = Report()


def _allowed(loc: tuple) -> str:
    """Names of the fields allowed where an unknown key was found."""
    cls: type[BaseModel] | None = Params
    for part in loc[:-1]:
        if cls is None or isinstance(part, int):
            continue
        f = cls.model_fields.get(part)
        ann = f.annotation if f else None
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return ", ".join(cls.model_fields) if cls else ""


def _format(err: ValidationError, path: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p in (
            "python-stdlib", "python-site-packages", "directory", "jsonl", "csv", "parquet",
            "hf-dataset")))
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed(loc)
            lines.append(f"{path}: unknown key '{key}'" + (f" (allowed: {allowed})" if allowed else ""))
        elif e["type"] == "missing":
            lines.append(f"{path}: {key} is required but missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{path}: {key} = {e.get('input')!r}: {msg}")
    return "; ".join(lines)


def load(path: str | os.PathLike = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; raise UserError with a one-line message on any problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"{path} not found (run from the repository root)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: top level must be a mapping of groups, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise UserError(_format(e, str(path))) from None
