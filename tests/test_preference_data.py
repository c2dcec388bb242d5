"""Preference pairs: the accepted shapes, HH-RLHF parsing, rejects with reasons, length handling."""

import gzip
import json

import pytest

from data_recipes.preference_data import (PairFields, collate_pairs, load_pairs, pair_to_row, parse_hh,
                                          tokenize_pairs)
from posttrain.embedded import build_tokenizer



@pytest.fixture(scope="module")
def HH(shared_data):
    return shared_data / "hh_harmless_test.jsonl.gz"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_parse_hh_dialogue_into_messages():
    text = "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: what is 2+2?\n\nAssistant: 4"
    assert parse_hh(text) == [
        {"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello!"},
        {"role": "user", "content": "what is 2+2?"}, {"role": "assistant", "content": "4"}]


def test_real_hh_rows_share_their_prompt_and_differ_in_the_last_answer(HH):
    pairs, rejects = load_pairs(str(HH), limit=50)
    assert len(pairs) == 50
    first = json.loads(gzip.open(HH, "rt").readline())
    p = pairs[0]
    assert p.prompt + p.chosen == parse_hh(first["chosen"])
    assert p.prompt + p.rejected == parse_hh(first["rejected"])
    for p in pairs:
        assert p.chosen[-1]["role"] == p.rejected[-1]["role"] == "assistant"
        assert p.prompt and p.prompt[-1]["role"] == "user"


def test_shapes_and_rejects(tmp_path):
    rows = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1.5, "subset": "math"},       # strings
        {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],  # whole chats
         "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]},
        {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "b"}]},                                     # explicit prompt
        {"prompt": "x", "chosen": "same", "rejected": "same"},                                      # identical
        {"prompt": "x", "chosen": "a"},                                                             # no rejected
        {"prompt": "x", "chosen": "a", "rejected": "b", "margin": "big"},                          # bad margin
        {"prompt": "x", "chosen": "  ", "rejected": "b"},                                           # empty answer
        {"prompt": "x", "chosen": [{"role": "robot", "content": "a"}], "rejected": "b"},            # bad role
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    pairs, rejects = load_pairs(str(path))
    assert [p.id for p in pairs] == ["pairs-1", "pairs-2", "pairs-3"]
    assert pairs[0].margin == 1.5 and pairs[0].subset == "math"
    assert pairs[0].prompt == [{"role": "user", "content": "2+2?"}]
    assert pairs[1].prompt == [{"role": "user", "content": "hi"}]
    assert pairs[1].chosen == [{"role": "assistant", "content": "hello"}]
    reasons = {r["line"]: r["reason"] for r in rejects}
    assert reasons[4] == "chosen and rejected are identical"
    assert reasons[5] == "missing field 'rejected'"
    assert "must be a number" in reasons[6]
    assert reasons[7] == "empty answer"
    assert "messages" in reasons[8]
    assert reasons[9].startswith("bad_record")
    # the row form written by recipes reads back to the same pair
    back = tmp_path / "back.jsonl"
    back.write_text(json.dumps(pair_to_row(pairs[2])) + "\n")
    again, _ = load_pairs(str(back))
    assert (again[0].prompt, again[0].chosen, again[0].rejected) == (pairs[2].prompt, pairs[2].chosen,
                                                                      pairs[2].rejected)


def test_field_mapping(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "q", "good": "a", "bad": "b", "cat": "s1"}) + "\n")
    pairs, rejects = load_pairs(str(path), PairFields(prompt="question", chosen="good", rejected="bad",
                                                      subset="cat"))
    assert not rejects and pairs[0].subset == "s1" and pairs[0].chosen[0]["content"] == "a"


def test_overlong_pairs_are_dropped_or_truncated_and_counted(tok):
    from data_recipes.preference_data import PreferencePair

    long_prompt = [{"role": "user", "content": "word " * 300}]
    pairs = [PreferencePair("short", [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "a"}],
                            [{"role": "assistant", "content": "b"}]),
             PreferencePair("long", long_prompt, [{"role": "assistant", "content": "yes"}],
                            [{"role": "assistant", "content": "no way"}])]
    kept, skipped, counts = tokenize_pairs(tok, pairs, max_length=64, overlong="drop")
    assert [k.pair.id for k in kept] == ["short"]
    assert skipped[0]["id"] == "long" and skipped[0]["reason"].startswith("overlong")
    assert counts["overlong"] == 1 and counts["skipped"] == 1
    kept, skipped, counts = tokenize_pairs(tok, pairs, max_length=64, overlong="truncate")
    assert len(kept) == 2 and not skipped and counts["truncated"] == 1
    long = kept[1]
    assert len(long.chosen_ids) <= 64 and len(long.rejected_ids) <= 64 and long.truncated
    full_c = tok.apply_chat_template(long_prompt + pairs[1].chosen, tokenize=True, return_dict=True)["input_ids"]
    assert long.chosen_ids[0] == tok.bos_token_id
    assert long.chosen_ids[1:] == list(full_c[len(full_c) - 63:])  # the end (the answer) is whole


def test_collate_puts_chosen_first_and_pads_either_side(tok):
    from data_recipes.preference_data import PreferencePair

    pairs = [PreferencePair(str(i), [{"role": "user", "content": "q" * (i + 1)}],
                            [{"role": "assistant", "content": "yes " * (i + 1)}],
                            [{"role": "assistant", "content": "no"}], margin=float(i)) for i in range(3)]
    kept, _, _ = tokenize_pairs(tok, pairs, 128)
    for side in ("right", "left"):
        b = collate_pairs(kept, tok.pad_token_id, padding_side=side)
        assert b["input_ids"].shape[0] == 6
        for i, k in enumerate(kept):
            for row, ids in ((i, k.chosen_ids), (i + 3, k.rejected_ids)):
                m = b["attention_mask"][row].bool()
                assert b["input_ids"][row][m].tolist() == ids
                real = m.nonzero().flatten()
                assert real.numel() == len(ids) and int(real[-1] - real[0]) == len(ids) - 1  # contiguous
                assert int(real[0] if side == "right" else real[-1]) == (0 if side == "right" else m.numel() - 1)
        assert b["margin"].tolist() == [0.0, 1.0, 2.0]
