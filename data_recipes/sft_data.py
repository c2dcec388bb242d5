"""SFT data: a weighted mixture of chat or prompt/completion sources, tokenized with the chat
template, loss on assistant (or completion) tokens only, packed with sample isolation.

Pipeline (HF datasets throughout: Arrow on disk, memory-mapped, multiprocess `map`):
  1. each source (jsonl / parquet / saved HF dataset) is read and given its share of the
     mixture: weight w takes round(w * len) rows (w > 1 repeats rows), drawn with the seed;
     a row used several times is tokenized once;
  2. tokenize: `messages` through `tokenizer.apply_chat_template` with the assistant mask
     (`{% generation %}` templates), or a prefix-difference mask for templates without it;
     `prompt` + `completion` rows train on the completion only;
  3. over-long samples are truncated or dropped, as configured, and counted either way;
  4. packing: best-fit decreasing into rows of max_length; each packed row keeps its
     samples apart (segment ids; positions restart per sample), so attention never crosses
     samples; the packing efficiency is reported;
  5. the result is saved under a content hash of the sources, the tokenizer and these
     settings; a rerun with the same inputs loads it instead of redoing the work.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from posttrain.config import setting
from posttrain.errors import DataError
from posttrain.io_utils import read_jsonl

from .packing import pack_best_fit, write_packed

IGNORE_INDEX = -100


@dataclass
class SourceSpec:
    path: str
    weight: float = setting(1.0, ge=0)
    name: str | None = None


@dataclass
class SFTDataConfig:
    sources: list[SourceSpec]
    max_length: int = 4096
    overlong: str = "drop"            # "drop" or "truncate"
    pack: bool = True
    seed: int = 0
    num_proc: int = 2
    cache_dir: str = ".cache/posttrain/sft"
    min_loss_tokens: int = 1          # samples with no trained token are dropped (and counted)

    def validate(self) -> "SFTDataConfig":
        if self.overlong not in ("drop", "truncate"):
            raise ValueError(f"overlong must be 'drop' or 'truncate', got {self.overlong!r}")
        if not self.sources:
            raise ValueError("SFT data needs at least one source")
        for s in self.sources:
            if s.weight < 0:
                raise ValueError(f"source {s.path}: weight must be >= 0")
        return self


# --------------------------------------------------------------------------- masks
def _has_generation_block(tokenizer) -> bool:
    return "endgeneration" in (tokenizer.chat_template or "")


def chat_ids_and_mask(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and a 0/1 mask that is 1 exactly on assistant tokens."""
    if _has_generation_block(tokenizer):
        enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(enc["input_ids"]), list(enc["assistant_masks"])
    # Templates without {% generation %}: render growing prefixes; what an assistant turn
    # adds to the token sequence is that turn's tokens.
    ids: list[int] = []
    mask: list[int] = []
    for i, message in enumerate(messages):
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=True, return_dict=True)["input_ids"]
        if upto[: len(ids)] != ids:
            raise ValueError("the chat template re-renders earlier turns; it needs a {% generation %} block "
                             "for assistant masks")
        added = upto[len(ids):]
        ids = list(upto)
        mask += [1 if message["role"] == "assistant" else 0] * len(added)
    return ids, mask


def _hard_boundaries(tokenizer) -> tuple[tuple[str, ...], bool]:
    """Added-token strings at which encoding always splits, and whether they are safe to cut at
    (no lstrip/rstrip that would swallow neighbouring text)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens = tuple(t.content for t in decoder.values() if t.content)
    safe = all(not getattr(t, "lstrip", False) and not getattr(t, "rstrip", False) for t in decoder.values())
    return tokens, safe


def chat_batch_by_pieces(tokenizer, conversations: list[list[dict]]) -> list[tuple[list[int], list[int]] | None]:
    """(ids, mask) per conversation, or None where this fast path cannot be exact.

    The template is rendered once with its {% generation %} spans; the text is cut at the span
    edges and the pieces are encoded in one batch without offsets (the Rust tokenizer's fast
    path). Encoding always splits at added tokens, so when every cut touches one (DeepSeek's
    <｜Assistant｜> before a turn, eos after it) the pieces' tokens are exactly the whole
    text's tokens; a conversation with any other cut gets None (the caller uses the exact
    offsets-based mask for it)."""
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError:
        return [None] * len(conversations)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return [None] * len(conversations)
    added, safe = _hard_boundaries(tokenizer)
    if not safe:
        return [None] * len(conversations)
    rendered, spans = render_jinja_template(conversations, chat_template=tokenizer.chat_template,
                                            return_assistant_tokens_mask=True, **tokenizer.special_tokens_map)

    def hard(text: str, k: int) -> bool:
        return k in (0, len(text)) or any(text.startswith(t, k) or text.endswith(t, 0, k) for t in added)

    pieces: list[str] = []
    layout: list[list[tuple[int, int]] | None] = []  # per conversation: (piece index, is assistant)
    for text, gen in zip(rendered, spans):
        edges = sorted((s, e) for s, e in gen)
        cuts = [k for s, e in edges for k in (s, e)]
        if any(not hard(text, k) for k in cuts) or any(a > b for a, b in zip(cuts, cuts[1:])):
            layout.append(None)
            continue
        row, pos = [], 0
        for s, e in edges:
            for a, b, flag in ((pos, s, 0), (s, e, 1)):
                if b > a:
                    row.append((len(pieces), flag))
                    pieces.append(text[a:b])
            pos = e
        if pos < len(text):
            row.append((len(pieces), 0))
            pieces.append(text[pos:])
        layout.append(row)
    encoded = backend.encode_batch_fast(pieces, add_special_tokens=False) if pieces else []
    out: list[tuple[list[int], list[int]] | None] = []
    for row in layout:
        if row is None:
            out.append(None)
            continue
        ids: list[int] = []
        mask: list[int] = []
        for piece, flag in row:
            piece_ids = encoded[piece].ids
            ids += piece_ids
            mask += [flag] * len(piece_ids)
        out.append((ids, mask))
    return out


def tokenize_rows(tokenizer, rows: list[dict]) -> list[dict]:
    """tokenize_row for many rows. Chats with a {% generation %} template are rendered once and
    encoded piecewise in one batch (`chat_batch_by_pieces`); the rest go through one batched
    chat-template call with offsets, or row by row."""
    chats = [i for i, r in enumerate(rows) if r.get("messages") is not None]
    out: list[dict | None] = [None] * len(rows)
    if chats and _has_generation_block(tokenizer):
        fast = chat_batch_by_pieces(tokenizer, [rows[i]["messages"] for i in chats])
        for i, enc in zip(chats, fast):
            if enc is not None:
                out[i] = {"input_ids": enc[0], "loss_mask": enc[1]}
        chats = [i for i in chats if out[i] is None]
    if len(chats) > 1 and _has_generation_block(tokenizer):
        enc = tokenizer.apply_chat_template([rows[i]["messages"] for i in chats], tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        for k, i in enumerate(chats):
            out[i] = {"input_ids": list(enc["input_ids"][k]), "loss_mask": list(enc["assistant_masks"][k])}
    return [o if o is not None else tokenize_row(tokenizer, r) for o, r in zip(out, rows)]


def tokenize_row(tokenizer, row: dict) -> dict:
    """{input_ids, loss_mask} for a `messages` row or a `prompt` + `completion` row."""
    if row.get("messages") is not None:
        ids, mask = chat_ids_and_mask(tokenizer, row["messages"])
    elif row.get("prompt") is not None and row.get("completion") is not None:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list):  # conversational prompt/completion
            ids_p = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                                  return_dict=True)["input_ids"]
            text_c = completion if isinstance(completion, str) else "".join(m["content"] for m in completion)
            ids_c = tokenizer(text_c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        else:
            ids_p = tokenizer(prompt)["input_ids"]
            ids_c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids, mask = list(ids_p) + list(ids_c), [0] * len(ids_p) + [1] * len(ids_c)
    else:
        raise ValueError("a row needs `messages`, or `prompt` and `completion`")
    return {"input_ids": ids, "loss_mask": mask}


# --------------------------------------------------------------------------- row checks
ROLES = ("system", "user", "assistant", "tool")


def _chat_problem(messages, what: str) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"`{what}` must be a non-empty list of messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"`{what}[{i}]` must be an object with role and content"
        if m.get("role") not in ROLES:
            return f"`{what}[{i}].role` must be one of {', '.join(ROLES)}, got {str(m.get('role'))[:40]!r}"
        if not isinstance(m.get("content"), str):
            return f"`{what}[{i}].content` must be text, got {type(m.get('content')).__name__}"
    return None


def row_problem(row: dict) -> str | None:
    """Why a row cannot be trained on, in words; None if it can."""
    if row.get("messages") is not None:
        why = _chat_problem(row["messages"], "messages")
        if why:
            return why
        if not any(m["role"] == "assistant" and m["content"] for m in row["messages"]):
            return "no assistant turn with text: nothing to train on"
        return None
    prompt, completion = row.get("prompt"), row.get("completion")
    if prompt is None or completion is None:
        return "a row needs `messages`, or `prompt` and `completion`"
    if not isinstance(prompt, str):
        why = _chat_problem(prompt, "prompt")
        if why:
            return why
    if not isinstance(completion, str):
        why = _chat_problem(completion, "completion")
        if why:
            return why
    return None


def system_prompt_of(row: dict) -> str:
    """The row's system prompt ("" without one), for the provenance a checkpoint keeps."""
    chat = row.get("messages") if row.get("messages") is not None else row.get("prompt")
    if isinstance(chat, list) and chat and isinstance(chat[0], dict) and chat[0].get("role") == "system":
        return str(chat[0].get("content") or "")
    return ""


def tokenize_checked(tokenizer, rows: list[dict]) -> list[dict | str]:
    """tokenize_rows, with each row that cannot be used as its reason (a string) instead."""
    problems = [row_problem(r) for r in rows]
    good = [i for i, p in enumerate(problems) if p is None]
    out: list[dict | str] = [p for p in problems]
    try:
        for i, enc in zip(good, tokenize_rows(tokenizer, [rows[i] for i in good])):
            out[i] = enc
    except Exception:  # noqa: BLE001 - one row the template or tokenizer refuses: find it, keep the rest
        for i in good:
            try:
                out[i] = tokenize_row(tokenizer, rows[i])
            except Exception as e:  # noqa: BLE001 - the reason goes to the rejects file
                out[i] = f"cannot be tokenized: {type(e).__name__}: {str(e)[:200]}"
    return out


# --------------------------------------------------------------------------- sources
KEEP_COLUMNS = ("messages", "prompt", "completion")


def _load(spec: SourceSpec, cache_dir: str):
    """(dataset, rejects): a file whose lines Arrow cannot read as one table (a malformed line,
    a field whose type changes between rows) is read line by line instead, each usable row kept
    as JSON text and every other line sent to the rejects with its reason."""
    import datasets

    path = Path(spec.path)
    if not path.exists():
        raise FileNotFoundError(f"SFT source {spec.path}: no such file or directory")
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise FileNotFoundError(f"SFT source {spec.path}: a directory, but not a saved HF dataset") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"]
        return ds, []
    if path.suffix == ".parquet":
        try:
            return datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=cache_dir), []
        except Exception as e:  # noqa: BLE001 - a corrupt file: one line naming it
            raise DataError(f"SFT source {spec.path}: not a readable parquet file ({type(e).__name__})") from None
    if path.suffix in (".jsonl", ".json") or path.name.endswith(".jsonl.gz"):
        try:
            ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)
            if any(c in ds.column_names for c in KEEP_COLUMNS):
                return ds, []
        except Exception:  # noqa: BLE001 - read it line by line below, with a reason per bad line
            pass
        return _load_lines(path, spec.name or path.name)
    raise FileNotFoundError(f"SFT source {spec.path}: expected .jsonl, .parquet or a saved HF dataset directory")


def _as_row_json(batch: dict) -> dict:
    n = len(next(iter(batch.values())))
    return {"row_json": [json.dumps({k: v[i] for k, v in batch.items() if v[i] is not None}, ensure_ascii=False)
                         for i in range(n)]}


def _load_lines(path: Path, name: str):
    import datasets

    rows, rejects = [], []
    for n, rec, why, raw in read_jsonl(path, raw=True):
        if rec is not None:
            why = row_problem(rec)
        if why:
            rejects.append({"source": name, "line": n, "reason": why, "text": raw})
            continue
        rows.append({"row_json": json.dumps({k: rec[k] for k in KEEP_COLUMNS if k in rec}, ensure_ascii=False)})
    ds = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({"row_json": []})
    return ds, rejects


PREPARE_VERSION = 2  # what prepare() writes; a change here makes older caches unused


def _fingerprint(cfg: SFTDataConfig, tokenizer) -> str:
    h = hashlib.sha256(f"prepare v{PREPARE_VERSION}".encode())
    for s in cfg.sources:
        p = Path(s.path)
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        for f in files:
            if f.is_file():
                st = f.stat()
                h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps({k: v for k, v in asdict(cfg).items() if k not in ("num_proc", "cache_dir")},
                        sort_keys=True, default=str).encode())
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    h.update((tokenizer.chat_template or "").encode())
    return h.hexdigest()[:24]


def _load_prepared(path: Path):
    import datasets

    if (path / "packed.arrow").exists():
        return datasets.Dataset.from_file(str(path / "packed.arrow"))
    if (path / "data").exists():
        return datasets.load_from_disk(str(path / "data"))
    return None  # nothing was usable (stats.json and rejects.jsonl say why)


@dataclass
class PreparedData:
    dataset: Any                      # datasets.Dataset of packed (or single) rows
    stats: dict = field(default_factory=dict)
    path: Path | None = None


def prepare(cfg: SFTDataConfig, tokenizer) -> PreparedData:
    """Mixture -> tokens + masks -> (packed) rows, cached by content hash."""
    import datasets

    cfg.validate()
    key = _fingerprint(cfg, tokenizer)
    out = Path(cfg.cache_dir) / key
    if (out / "stats.json").exists():
        return PreparedData(_load_prepared(out), json.loads((out / "stats.json").read_text()), out)
    t0 = time.perf_counter()
    # Each distinct source row is tokenized once, in file order (each worker reads a contiguous
    # range of the memory-mapped files); the mixture is an index array into the tokenized rows,
    # with a row repeated as often as its weight asks.
    parts, per_source, picks, offset = [], {}, [], 0
    read_rejects, origin = [], []        # origin: (source name, row in source) of each tokenized row
    rng = np.random.default_rng(cfg.seed)
    for spec in cfg.sources:
        ds, bad = _load(spec, cfg.cache_dir)
        name = spec.name or Path(spec.path).name
        read_rejects += bad
        n = int(round(spec.weight * len(ds)))
        idx = np.concatenate([rng.permutation(len(ds)) for _ in range(max(1, -(-n // max(len(ds), 1))))])[:n]
        unique, counts = np.unique(idx, return_counts=True)
        parts.append(ds.select(unique) if len(unique) < len(ds) else ds)
        origin += [(name, int(i)) for i in unique]
        picks.append(offset + np.repeat(np.arange(len(unique)), counts))
        offset += len(unique)
        per_source[name] = {"rows": len(ds), "taken": n, "weight": spec.weight, "unreadable": len(bad)}
    keep_cols = KEEP_COLUMNS + ("row_json",)

    parts = [p.remove_columns([c for c in p.column_names if c not in keep_cols]) for p in parts]
    if any(p.features != parts[0].features for p in parts):  # sources in other schemas: rows as JSON text
        parts = [p if "row_json" in p.column_names else
                 p.map(_as_row_json, batched=True, remove_columns=p.column_names, desc="rows") for p in parts]

    mixture = datasets.concatenate_datasets(parts)
    if len(mixture) == 0:  # nothing readable: no tokenization; the reasons go back to the stage
        stats = {"sources": per_source, "samples": 0, "samples_kept": 0, "rejected": len(read_rejects),
                 "reject_reasons": dict(Counter(r["reason"].split(":")[0] for r in read_rejects)),
                 "system_prompts": [], "rows": 0, "tokens": 0, "fingerprint": key}
        _publish(out.with_name(out.name + f".tmp-{os.getpid()}"), out, stats, read_rejects)
        return PreparedData(None, stats, out)
    samples = np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)
    max_len, truncate = cfg.max_length, cfg.overlong == "truncate"

    def tok(batch):
        out = {"input_ids": [], "loss_mask": [], "length": [], "overlong": [], "loss_tokens": [], "reject": [],
               "system": []}
        if "row_json" in batch:
            rows = [json.loads(r) for r in batch["row_json"]]
        else:
            rows = [dict(zip(batch.keys(), vals)) for vals in zip(*batch.values())]
        for row, enc in zip(rows, tokenize_checked(tokenizer, rows)):
            if isinstance(enc, str):  # the reason this row cannot be used
                ids, mask, reject = [], [], enc
            else:
                ids, mask, reject = enc["input_ids"], enc["loss_mask"], ""
            over = len(ids) > max_len
            if over and truncate:
                ids, mask = ids[:max_len], mask[:max_len]
            out["input_ids"].append(ids)
            out["loss_mask"].append(mask)
            out["length"].append(len(ids))
            out["overlong"].append(over)
            out["loss_tokens"].append(int(sum(mask[1:])))
            out["reject"].append(reject)
            out["system"].append(system_prompt_of(row) if not reject else "")
        return out

    # narrow types: at 1.5M samples, int64 token lists would be several GB of memory-mapped pages
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "loss_mask": datasets.Sequence(datasets.Value("int8")),
                                  "length": datasets.Value("int32"), "overlong": datasets.Value("bool"),
                                  "loss_tokens": datasets.Value("int32"), "reject": datasets.Value("string"),
                                  "system": datasets.Value("string")})
    tokenized = mixture.map(tok, batched=True, batch_size=256, num_proc=cfg.num_proc if len(mixture) > 2000 else None,
                            remove_columns=mixture.column_names, features=features, desc="tokenize")
    row_len = np.asarray(tokenized["length"])
    row_over = np.asarray(tokenized["overlong"])
    reasons = tokenized["reject"]
    row_ok = np.asarray([not r for r in reasons], dtype=bool)
    row_keep = (row_len <= max_len if not truncate else np.ones(len(tokenized), dtype=bool)) & row_ok
    row_loss_ok = np.asarray(tokenized["loss_tokens"]) >= cfg.min_loss_tokens
    # counts are per sample of the mixture (a repeated row counts each time it is used)
    overlong = int((row_over & row_ok)[samples].sum())
    no_loss = int((row_keep & ~row_loss_ok)[samples].sum())
    kept = samples[(row_keep & row_loss_ok)[samples]]
    rejects = read_rejects + [{"source": origin[i][0], "row": origin[i][1], "reason": r}
                              for i, r in enumerate(reasons) if r]
    systems = np.asarray(tokenized["system"], dtype=object)[kept] if len(kept) else np.asarray([], dtype=object)
    system_counts = {}
    for text in systems.tolist():
        system_counts[text] = system_counts.get(text, 0) + 1
    kept = kept[rng.permutation(len(kept))]  # mixture order: sources interleaved, seeded
    lengths = row_len[kept]
    tokenized = tokenized.remove_columns(["overlong", "loss_tokens", "reject", "system"])
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    if cfg.pack:
        bins = [[int(kept[j]) for j in row] for row in pack_best_fit(lengths, max_len)]
        data = write_packed(tokenized, bins, tmp / "packed.arrow")
        n_rows = len(bins)
    else:
        data = tokenized.select(kept).remove_columns(["length"])
        n_rows = len(data)
    tokens = int(lengths.sum())
    stats = {
        "sources": per_source, "samples": int(len(samples)), "samples_kept": int(len(kept)),
        "distinct_rows_tokenized": int(len(tokenized)),
        "overlong": overlong, "overlong_action": cfg.overlong,
        "dropped_overlong": overlong if not truncate else 0, "dropped_no_loss_tokens": no_loss,
        "rejected": len(rejects), "reject_reasons": dict(Counter(r["reason"].split(":")[0] for r in rejects)),
        "system_prompts": [{"system_prompt": k or None, "samples": v}
                           for k, v in sorted(system_counts.items(), key=lambda kv: -kv[1])[:5]],
        "rows": n_rows, "tokens": tokens, "max_length": max_len,
        "packing_efficiency": tokens / (n_rows * max_len) if cfg.pack and n_rows else None,
        "prepare_s": time.perf_counter() - t0, "fingerprint": key,
    }
    if not cfg.pack:
        data.save_to_disk(str(tmp / "data"))
    _publish(tmp, out, stats, rejects)
    return PreparedData(_load_prepared(out), stats, out)


def _publish(tmp: Path, out: Path, stats: dict, rejects: list[dict]) -> None:
    """Write the rejects and stats beside the data in `tmp`, then put `tmp` in place of the
    cache entry `out` in one rename (stats.json present = complete)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "rejects.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)


# --------------------------------------------------------------------------- batches
def collate(rows: list[dict], pad_token_id: int, pad_to: int | None = None) -> dict:
    """Packed (or single) rows -> model inputs. labels[t] = token t+1 where token t+1 is trained
    and belongs to the same sample; padding has segment -1 and no labels."""
    import torch

    T = pad_to or max(len(r["input_ids"]) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    segment_ids = torch.full((B, T), -1, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids = torch.tensor(r["input_ids"][:T], dtype=torch.long)
        mask = torch.tensor(r["loss_mask"][:T], dtype=torch.bool)
        n = len(ids)
        seg = torch.tensor(r["segment_ids"][:T], dtype=torch.long) if "segment_ids" in r else torch.zeros(n, dtype=torch.long)
        pos = torch.tensor(r["position_ids"][:T], dtype=torch.long) if "position_ids" in r else torch.arange(n)
        input_ids[b, :n], segment_ids[b, :n], position_ids[b, :n] = ids, seg, pos
        same = seg[1:] == seg[:-1]
        labels[b, : n - 1] = torch.where(mask[1:] & same, ids[1:], torch.tensor(IGNORE_INDEX))
    return {"input_ids": input_ids, "labels": labels, "segment_ids": segment_ids, "position_ids": position_ids}
