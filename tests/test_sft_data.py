"""SFT data: assistant-only loss masks, labels across packed samples, packing, mixture, cache."""

import json

import numpy as np
import pytest

from data_recipes.packing import pack_best_fit
from data_recipes.sft_data import IGNORE_INDEX, SFTDataConfig, SourceSpec, chat_ids_and_mask, collate, prepare
from posttrain.embedded import build_tokenizer

CHAT = [
    {"role": "system", "content": "You are careful."},
    {"role": "user", "content": "Compute 2 + 3."},
    {"role": "assistant", "content": "<think>2 + 3 = 5</think> The answer is 5."},
    {"role": "user", "content": "And times 4?"},
    {"role": "assistant", "content": "5 * 4 = 20, so \\boxed{20}."},
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(640)


def _spans(mask):
    spans, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        if not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_mask_covers_exactly_the_assistant_tokens_of_a_multi_turn_chat(tok):
    ids, mask = chat_ids_and_mask(tok, CHAT)
    assert len(ids) == len(mask)
    spans = _spans(mask)
    assert len(spans) == 2
    for (a, b), turn in zip(spans, [CHAT[2], CHAT[4]]):
        assert ids[a:b] == tok(turn["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # token by token: nothing outside the spans is trained
    inside = {i for a, b in spans for i in range(a, b)}
    assert all(mask[i] == (1 if i in inside else 0) for i in range(len(ids)))
    assert tok.convert_tokens_to_ids("<｜Assistant｜>") not in [ids[i] for i in inside]


def test_prefix_difference_mask_agrees_for_templates_without_generation_blocks(tok):
    ids, mask = chat_ids_and_mask(tok, CHAT)
    stripped = tok.chat_template.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    assert "endgeneration" not in stripped
    original = tok.chat_template
    tok.chat_template = stripped
    try:
        ids2, mask2 = chat_ids_and_mask(tok, CHAT)
    finally:
        tok.chat_template = original
    assert ids2 == ids
    # the prefix method also marks the "<｜Assistant｜>" header rendered with each turn; the
    # trained content (with eos) must be inside what it marks
    assert all(m2 >= m for m, m2 in zip(mask, mask2))


def test_collate_labels_stay_inside_samples_and_on_trained_tokens():
    row = {"input_ids": [10, 11, 12, 13, 20, 21, 22], "loss_mask": [0, 0, 1, 1, 0, 1, 1],
           "segment_ids": [0, 0, 0, 0, 1, 1, 1], "position_ids": [0, 1, 2, 3, 0, 1, 2]}
    b = collate([row], pad_token_id=2, pad_to=9)
    assert b["labels"][0].tolist() == [IGNORE_INDEX, 12, 13, IGNORE_INDEX, 21, 22, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert b["segment_ids"][0].tolist()[-2:] == [-1, -1] and b["input_ids"][0].tolist()[-2:] == [2, 2]


def test_best_fit_packing_places_everything_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 400, size=2000)
    bins = pack_best_fit(lengths, 512)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(2000))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    efficiency = lengths.sum() / (len(bins) * 512)
    assert efficiency > 0.95


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_mixture_overlong_policy_and_cache(tok, tmp_path):
    chats = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a " * (i % 7 + 1)}]}
             for i in range(40)]
    long_chat = {"messages": [{"role": "user", "content": "long"}, {"role": "assistant", "content": "word " * 300}]}
    pc = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(10)]
    a = _write(tmp_path / "a.jsonl", chats + [long_chat])
    b = _write(tmp_path / "b.jsonl", pc)
    cfg = SFTDataConfig([SourceSpec(a, 1.0), SourceSpec(b, 2.0)], max_length=64, cache_dir=str(tmp_path / "cache"))
    dropped = prepare(cfg, tok)
    s = dropped.stats
    assert s["samples"] == 41 + 20 and s["overlong"] == 1 and s["dropped_overlong"] == 1 and s["samples_kept"] == 60
    assert 0 < s["packing_efficiency"] <= 1
    rows = dropped.dataset
    assert sum(len(set(r["segment_ids"])) for r in rows) == 60
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    # every packed segment is exactly one tokenized sample, with its mask, positions from 0
    from data_recipes.sft_data import tokenize_row

    expected = sorted(tuple(tokenize_row(tok, r)["input_ids"]) for r in chats + pc + pc)
    got, masks = [], []
    for r in rows:
        for seg in sorted(set(r["segment_ids"])):
            idx = [i for i, v in enumerate(r["segment_ids"]) if v == seg]
            got.append(tuple(r["input_ids"][i] for i in idx))
            assert [r["position_ids"][i] for i in idx] == list(range(len(idx)))
            masks.append(tuple(r["loss_mask"][i] for i in idx))
    assert sorted(got) == expected
    assert all(any(m) for m in masks)
    again = prepare(cfg, tok)
    assert again.path == dropped.path and again.stats == s  # served from the cache
    truncated = prepare(SFTDataConfig([SourceSpec(a, 1.0)], max_length=64, overlong="truncate",
                                      cache_dir=str(tmp_path / "cache")), tok)
    assert truncated.stats["overlong"] == 1 and truncated.stats["samples_kept"] == 41


def test_piecewise_batch_encoding_equals_the_exact_offsets_path(tok):
    """The fast path (render once, encode pieces without offsets) must give the very ids and
    masks of the exact path, on chats that stress the cuts: system turns, several assistant
    turns, unicode, digits, leading spaces and newlines, empty-looking content."""
    from data_recipes.sft_data import chat_batch_by_pieces

    chats = [CHAT,
             [{"role": "user", "content": "让我们算一下 12+7"}, {"role": "assistant", "content": " 19 🙂\n"}],
             [{"role": "user", "content": "\n\n  spaced"}, {"role": "assistant", "content": "\n<think>\n</think>\n\n x"}],
             [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
              {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
              {"role": "assistant", "content": "1234567890"}]]
    fast = chat_batch_by_pieces(tok, chats)
    for chat, got in zip(chats, fast):
        assert got is not None  # every cut touches <｜Assistant｜> or eos
        assert got == chat_ids_and_mask(tok, chat)


def test_piecewise_encoding_declines_cuts_inside_text_and_tokenize_rows_stays_exact(tok):
    """A ChatML-like template whose assistant span starts after plain text: the fast path must
    decline those rows, and tokenize_rows must still return the exact ids and masks."""
    from data_recipes.sft_data import chat_batch_by_pieces, tokenize_rows

    original = tok.chat_template
    tok.chat_template = ("{%- for m in messages -%}{{- 'role: ' + m['role'] + '\\n' -}}"
                         "{%- if m['role'] == 'assistant' -%}{%- generation -%}{{- m['content'] + eos_token -}}"
                         "{%- endgeneration -%}{%- else -%}{{- m['content'] + '\\n' -}}{%- endif -%}{%- endfor -%}")
    try:
        chats = [CHAT[1:3], [{"role": "user", "content": "x"}, {"role": "assistant", "content": " y z"}]]
        fast = chat_batch_by_pieces(tok, chats)
        # the first answer starts with the added token <think>: its cut is a real split point
        assert fast[0] == chat_ids_and_mask(tok, chats[0])
        assert fast[1] is None  # " y z" after plain text: declined
        rows = tokenize_rows(tok, [{"messages": c} for c in chats])
        for chat, row in zip(chats, rows):
            ids, mask = chat_ids_and_mask(tok, chat)
            assert (row["input_ids"], row["loss_mask"]) == (ids, mask) and any(mask)
    finally:
        tok.chat_template = original
