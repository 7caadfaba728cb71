"""A lossless SentencePiece tokenizer for code, exported as a Hugging Face fast tokenizer.

Why not SentencePiece's defaults: NFKC rewrites characters, `remove_extra_whitespaces` collapses
indentation, and line-by-line training never sees a newline. Here:

- normalisation is the identity except for one reversible escape: SentencePiece uses U+2581 (▁) as
  its space marker, so a literal ▁ would decode as a space. It is written as U+E000 U+E001, and
  U+E000 itself as U+E000 U+E002 (normalisation rule + denormalisation rule inside spm.model, and
  the same two steps in tokenizer.json), so every string round-trips;
- training sentences are whole documents cut at line ends into chunks of at most
  `max_sentence_length` bytes, so newlines are ordinary characters that BPE merges with what
  surrounds them ("):\n", "\n\n", and with `split_by_whitespace: false` "\n▁▁▁▁return");
- whitespace-only pieces are allowed, so runs of indentation become single tokens;
- byte fallback: a character outside the vocabulary becomes its UTF-8 bytes, never <unk>.

Ids: <unk> 0, <s> (BOS) 1, </s> (EOS) 2, <pad> 3, then the fill-in-the-middle sentinels
<fim_prefix> 4, <fim_middle> 5, <fim_suffix> 6, <fim_pad> 7 (StarCoder's names; SentencePiece
control symbols, HF special tokens), then 256 byte pieces <0x00>..<0xFF>.
Encoding (SentencePiece `encode` and the HF tokenizer's `tok(text)`) adds NO BOS/EOS: callers add
them (training packs documents separated by EOS). Special-token text such as "</s>" or
"<fim_prefix>" inside a document is encoded as plain text, never as the special id
(split_special_tokens=True; SentencePiece never matches control symbols against text): a training
document cannot inject a control token. Only training code (codex_ml/training/fim.py) and
inference (`codex generate --suffix`) place sentinel ids, by id.
"""

from __future__ import annotations

import contextlib
import io as _stdio
import logging
import random
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from ..stage import UserError

log = logging.getLogger(__name__)

MODEL_FILE = "spm.model"
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# Fill-in-the-middle sentinels (StarCoder's spelling), ids 4-7 in a trained tokenizer; a pretrained
# base's tokenizer keeps its own ids for them (or gets them added: copy_pretrained).
FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD = "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"
FIM_TOKENS = (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD)
SPACE = "\u2581"                       # SentencePiece's whitespace marker
ESC, ESC_SPACE, ESC_ESC = "\ue000", "\ue001", "\ue002"
# SentencePiece rule files: hex code points of source<TAB>target.
NORM_RULES = "2581\tE000 E001\nE000\tE000 E002\n"
DENORM_RULES = "E000 E001\t2581\nE000 E002\tE000\n"
RESERVED = (" ", SPACE, ESC, ESC_SPACE, ESC_ESC)


# ---------------------------------------------------------------- training input
def chunks(text: str, max_bytes: int) -> Iterator[str]:
    """Cut a document at line ends into pieces of at most `max_bytes` UTF-8 bytes (newlines kept).

    A single line longer than that is cut at character boundaries.
    """
    cur: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        b = len(line.encode("utf-8"))
        if size + b > max_bytes and cur:
            yield "".join(cur)
            cur, size = [], 0
        while b > max_bytes:  # a very long line: cut it, keeping whole characters
            head = line.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")
            yield head
            line = line[len(head):]
            b = len(line.encode("utf-8"))
        cur.append(line)
        size += b
    if cur and size:
        yield "".join(cur)


def sample_chunks(texts: Iterable[str], max_bytes: int, max_count: int, seed: int) -> list[str]:
    """All chunks, or a seeded reservoir sample of `max_count` of them (0 = no limit), in input order.

    We sample here rather than in SentencePiece so that the choice depends only on the seed and the
    data, and memory stays bounded by the sample.
    """
    rng = random.Random(seed)
    kept: list[tuple[int, str]] = []
    for i, c in enumerate(c for t in texts for c in chunks(t, max_bytes)):
        if not max_count or len(kept) < max_count:
            kept.append((i, c))
        else:
            j = rng.randrange(i + 1)
            if j < max_count:
                kept[j] = (i, c)
    return [c for _, c in sorted(kept)]


def trainer_args(cfg, seed: int) -> dict:
    """SentencePiece trainer options for params group `tokenizer` (see the module docstring)."""
    return dict(
        model_type=cfg.model_type, vocab_size=cfg.vocab_size,
        character_coverage=cfg.character_coverage, byte_fallback=cfg.byte_fallback,
        split_digits=cfg.split_digits, split_by_whitespace=cfg.split_by_whitespace,
        user_defined_symbols=list(cfg.user_defined_symbols), max_sentencepiece_length=cfg.max_piece_length,
        max_sentence_length=cfg.max_sentence_length, num_threads=cfg.num_threads,
        normalization_rule_name="", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, input_sentence_size=0, shuffle_input_sentence=False,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
        control_symbols=list(FIM_TOKENS),  # ids 4-7, right after the four meta pieces
        unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
        hard_vocab_limit=cfg.model_type == "bpe", minloglevel=2, random_seed=seed,
    )


def train_spm(sentences: list[str], cfg, seed: int) -> bytes:
    """Train on `sentences` and return the serialized model (deterministic for data, cfg and seed)."""
    if not sentences:
        raise UserError("no training text: the train split is empty")
    args = trainer_args(cfg, seed)
    args.pop("random_seed")
    spm.set_random_generator_seed(seed)
    model = _stdio.BytesIO()
    # The rule files' paths are recorded inside the model: give them fixed relative names so the
    # model bytes do not depend on a temporary directory.
    with tempfile.TemporaryDirectory() as d, contextlib.chdir(d):
        Path("normalize.tsv").write_text(NORM_RULES)
        Path("denormalize.tsv").write_text(DENORM_RULES)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences), model_writer=model,
                normalization_rule_tsv="normalize.tsv", denormalization_rule_tsv="denormalize.tsv",
                **args)
        except RuntimeError as e:
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
            if "Vocabulary size" in msg or "vocab_size" in msg:
                raise UserError(f"tokenizer.vocab_size = {cfg.vocab_size} does not fit this corpus "
                                f"({msg}); lower it") from None
            raise
    return model.getvalue()


# ---------------------------------------------------------------- Hugging Face export
def hf_backend(sp: spm.SentencePieceProcessor, model_type: str, user_defined: Iterable[str]):
    """A `tokenizers.Tokenizer` that gives the same ids as `sp.encode` and decodes like `sp.decode`.

    Built directly (not through transformers' converters, which need protobuf and change between
    versions): BPE merges are ranked by piece score, as SentencePiece applies them.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE, Unigram

    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    special = [sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i)
               for i in range(len(pieces))]
    ud = set(user_defined)
    if model_type == "bpe":
        normal = {p: (sp.get_score(i), i) for i, p in enumerate(pieces) if not special[i] and p not in ud}
        ranked = sorted((-normal[t][0], normal[t][1], t[:k], t[k:])
                        for t in normal for k in range(1, len(t))
                        if t[:k] in normal and t[k:] in normal)
        model = BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[(a, b) for *_, a, b in ranked],
                    unk_token=UNK, fuse_unk=True, byte_fallback=True, dropout=None)
    else:
        # SentencePiece never matches control, unknown or byte pieces against text ("<s>", "<0x41>"
        # in a document stay characters); a score far below every real piece keeps Viterbi off them.
        floor = min(sp.get_score(i) for i in range(len(pieces)) if not special[i]) - 1000.0
        model = Unigram([(p, floor if special[i] else sp.get_score(i)) for i, p in enumerate(pieces)],
                        unk_id=UNK_ID, byte_fallback=True)
    tok = Tokenizer(model)
    # Same order as SentencePiece: escape ESC, then literal ▁, then spaces become ▁.
    tok.normalizer = normalizers.Sequence([
        normalizers.Replace(ESC, ESC + ESC_ESC), normalizers.Replace(SPACE, ESC + ESC_SPACE),
        normalizers.Replace(" ", SPACE)])
    # SentencePiece emits user-defined pieces whole wherever they occur.
    tok.add_tokens([AddedToken(p, normalized=True, special=False) for p in pieces if p in ud])
    # The sentinels keep their ids as special tokens (skipped by decode(skip_special_tokens=True));
    # encode_special_tokens (set from split_special_tokens) keeps their text in documents text.
    tok.add_special_tokens([AddedToken(p, normalized=False, special=True) for p in FIM_TOKENS])
    tok.decoder = decoders.Sequence([
        decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
        # after Fuse there is one string: undo the escape (ESC is always followed by its partner)
        decoders.Replace(ESC + ESC_SPACE, SPACE), decoders.Replace(ESC + ESC_ESC, ESC)])
    return tok


def to_hf(sp: spm.SentencePieceProcessor, cfg):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=hf_backend(sp, cfg.model_type, cfg.user_defined_symbols),
        unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        extra_special_tokens=list(FIM_TOKENS), split_special_tokens=True,
        clean_up_tokenization_spaces=False, padding_side="right")


def save(out_dir: str | Path, model_bytes: bytes, cfg) -> None:
    """Write spm.model and the HF tokenizer files into `out_dir` (an existing, empty directory)."""
    out_dir = Path(out_dir)
    (out_dir / MODEL_FILE).write_bytes(model_bytes)
    to_hf(spm.SentencePieceProcessor(model_proto=model_bytes), cfg).save_pretrained(out_dir)


# ---------------------------------------------------------------- loading
def load_sp(directory: str | Path) -> spm.SentencePieceProcessor:
    path = Path(directory) / MODEL_FILE if Path(directory).is_dir() else Path(directory)
    if not path.exists():
        raise UserError(f"no tokenizer model at {path} (run `python stages/train_tokenizer.py` "
                        "or `codex tokenizer train`)")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise UserError(f"{path} is not a valid SentencePiece model ({str(e).strip()[:120]}); "
                        "retrain it with `codex tokenizer train`") from None


def load(directory: str | Path = "models/tokenizer"):
    """The Hugging Face tokenizer of a tokenizer directory (offline). `tok(text)` adds no BOS/EOS."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not (directory / "tokenizer.json").exists() and not (directory / "tokenizer_config.json").exists():
        raise UserError(f"no Hugging Face tokenizer in {directory} (tokenizer.json missing; run "
                        "`python stages/train_tokenizer.py` or `codex tokenizer train`)")
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # a corrupt JSON file raises a different type in each library version
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the tokenizer in {directory}: {first}") from None


def copy_pretrained(base: str, trust_remote_code: bool, out_dir: str | Path) -> dict:
    """Save a pretrained model's own tokenizer into `out_dir`; return its summary for the metrics."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(base, trust_remote_code=trust_remote_code)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"model.base = {base!r}: cannot load its tokenizer ({first}); give a local "
                        "model directory (the hub is unreachable offline)") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # padding needs an id; EOS is the usual choice for causal LMs
    fim = ensure_fim_tokens(tok)
    tok.save_pretrained(out_dir)
    return {"source": "pretrained", "base": base, "vocab_size": len(tok),
            "bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id,
            "unk_id": tok.unk_token_id, "fim_sentinels": fim,
            "fim_ids": dict(zip(FIM_TOKENS, tok.convert_tokens_to_ids(list(FIM_TOKENS))))}


def fim_ids(tok) -> dict[str, int] | None:
    """{sentinel: id} when the HF tokenizer has all four FIM sentinels as single tokens, else None."""
    ids = dict(zip(FIM_TOKENS, tok.convert_tokens_to_ids(list(FIM_TOKENS))))
    if any(i is None or i == tok.unk_token_id for i in ids.values()):
        return None
    return ids


def psm_prompt(tok, prefix: str, suffix: str, max_tokens: int | None = None) -> list[int]:
    """The ids of an infilling prompt as FIM training spells PSM: the EOS start token train_model
    puts before every document, then <fim_prefix> prefix <fim_suffix> suffix <fim_middle>; the
    model writes the middle and ends it with EOS. Parts are encoded apart, as in training, their
    sentinel-looking text kept as text. Over `max_tokens` the prefix loses tokens from its start
    and the suffix from its end (the text next to the hole is kept), the suffix keeping at least
    half of what there is room for."""
    ids = fim_ids(tok)
    if ids is None:
        raise UserError(f"this tokenizer has no FIM sentinels ({', '.join(FIM_TOKENS)}): the model "
                        "cannot infill; retrain with train.fim.rate > 0")
    kw = dict(add_special_tokens=False, split_special_tokens=True)
    p, s = tok(prefix, **kw)["input_ids"], tok(suffix, **kw)["input_ids"]
    if max_tokens is not None:
        room = max(max_tokens - 4, 0)
        if len(p) + len(s) > room:
            keep_s = min(len(s), max(room // 2, room - len(p)))
            keep_p = room - keep_s
            p, s = (p[len(p) - keep_p:] if keep_p else []), s[:keep_s]
    return [tok.eos_token_id, ids[FIM_PREFIX], *p, ids[FIM_SUFFIX], *s, ids[FIM_MIDDLE]]


def ensure_fim_tokens(tok) -> str:
    """'present' when a base's tokenizer has StarCoder's four sentinels already (StarCoder,
    SantaCoder-style exports), else add them as special tokens and say 'added': train_model then
    grows the embeddings to the new vocabulary (new rows untrained until FIM trains them)."""
    if fim_ids(tok) is not None:
        return "present"
    tok.add_special_tokens({"extra_special_tokens": list(FIM_TOKENS)}, replace_extra_special_tokens=False)
    return "added"


# ---------------------------------------------------------------- checks and figures
def check(sp: spm.SentencePieceProcessor, hf, texts: Iterable[str], batch: int = 64,
          failures: list | None = None) -> dict:
    """Round-trip and HF-agreement over `texts`; returns counts (and appends failing indices)."""
    from .. import io

    n = rt = agree = nbytes = ntok = nbyte_tok = 0
    for buf in io.chunked(texts, batch):
        hf_ids = hf(buf, add_special_tokens=False)["input_ids"] if hf is not None else [None] * len(buf)
        for text, ids, h in zip(buf, sp.encode(buf), hf_ids):
            ok_rt = sp.decode(ids) == text
            ok_hf = h is None or (h == ids and hf.decode(h) == text)
            rt += ok_rt
            agree += ok_hf
            if failures is not None and not (ok_rt and ok_hf):
                failures.append((n, "round-trip" if not ok_rt else "hf-mismatch"))
            nbytes += len(text.encode("utf-8"))
            ntok += len(ids)
            nbyte_tok += sum(map(sp.is_byte, ids))
            n += 1
    return {"docs": n, "bytes": nbytes, "tokens": ntok, "byte_fallback_tokens": nbyte_tok,
            "roundtrip_ok": rt, "hf_agree": agree,
            "bytes_per_token": round(nbytes / ntok, 4) if ntok else None}


def train_dir(splits: str | Path, out: str | Path, p) -> dict:
    """The stage: train on `splits`/train, write `out` atomically, return metrics (val/test figures)."""
    from .. import io

    cfg = p.tokenizer
    with io.atomic_dir(out) as tmp:
        if p.model.init == "pretrained":
            summary = copy_pretrained(p.model.base, p.model.trust_remote_code, tmp)
            log.info("model.init is pretrained: copied %s's tokenizer instead of training", p.model.base)
            return {**summary, "trained": False}
        t0 = time.perf_counter()
        texts = (r["text"] for r in io.iter_rows(splits, "train", columns=["text"]))
        sentences = sample_chunks(texts, cfg.max_sentence_length, cfg.input_sentence_size, p.seed)
        model = train_spm(sentences, cfg, p.seed)
        seconds = time.perf_counter() - t0
        save(tmp, model, cfg)
        sp, hf = load_sp(tmp), load(tmp)
        metrics: dict = {"source": "trained", "trained": True, "model_type": cfg.model_type,
                         "vocab_size": sp.get_piece_size(), "train_seconds": round(seconds, 2),
                         "train_chunks": len(sentences), "unk_id": UNK_ID, "bos_id": BOS_ID,
                         "eos_id": EOS_ID, "pad_id": PAD_ID, "fim_sentinels": "present",
                         "fim_ids": fim_ids(hf), "spm_sha256": io.sha256_file(tmp / MODEL_FILE)}
        total = {"docs": 0, "roundtrip_ok": 0, "hf_agree": 0, "tokens": 0, "byte_fallback_tokens": 0}
        for split in ("val", "test"):
            if not io.shard_paths(splits, split):
                continue
            c = check(sp, hf, (r["text"] for r in io.iter_rows(splits, split, columns=["text"])))
            metrics[f"{split}_bytes_per_token"] = c["bytes_per_token"]
            metrics[f"{split}_docs"] = c["docs"]
            for k in total:
                total[k] += c[k]
        d = total["docs"]
        metrics["roundtrip_exact"] = total["roundtrip_ok"] / d if d else None
        metrics["hf_sp_identical"] = total["hf_agree"] / d if d else None
        metrics["byte_fallback_share"] = (round(total["byte_fallback_tokens"] / total["tokens"], 6)
                                          if total["tokens"] else None)
        if d and (total["roundtrip_ok"] < d or total["hf_agree"] < d):
            raise UserError(f"tokenizer check failed on val/test: {d - total['roundtrip_ok']} docs do not "
                            f"round-trip, {d - total['hf_agree']} differ between HF and SentencePiece "
                            "(`codex tokenizer validate --split val` lists them; bpe is the tested default)")
    return metrics
