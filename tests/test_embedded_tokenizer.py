"""Tests for the locally built DeepSeek-V3-style tokenizer.

Expected token strings are written out literally (not imported) so a typo in
the module's constants fails here.  Random inputs come from a fresh seed each
run; the seed is in every failure message.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from posttrain.embedded import build_tokenizer, make_problems, save_tokenizer

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
REPO_ROOT = Path(__file__).resolve().parents[1]

# Code point ranges spanning ASCII controls, Latin, Greek/Cyrillic, combining
# marks, CJK, fullwidth forms (the DeepSeek bars live there), and astral emoji.
_RANGES = [(0x00, 0x7F), (0xA0, 0x24F), (0x370, 0x4FF), (0x300, 0x36F), (0x4E00, 0x9FFF),
           (0xFF00, 0xFFEF), (0x1F300, 0x1FAFF), (0x10000, 0x1007F)]


def random_text(rng: random.Random, max_len: int = 80) -> str:
    chars = []
    for _ in range(rng.randint(0, max_len)):
        lo, hi = rng.choice(_RANGES)
        chars.append(chr(rng.randint(lo, hi)))
    if rng.random() < 0.5:
        chars.append(rng.choice([" ", "  ", "\n", "\n\n", "\t", "\r\n", " 123 ", "x = -42"]))
    return "".join(chars)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture
def rng() -> tuple[random.Random, int]:
    seed = random.SystemRandom().randrange(10**9)
    return random.Random(seed), seed


def _fingerprint(t) -> str:
    return hashlib.sha256(t.backend_tokenizer.to_str().encode()).hexdigest()


def test_two_builds_are_identical(rng):
    r, seed = rng
    size, corpus_seed = r.randint(300, 1200), r.randrange(1000)
    a, b = build_tokenizer(size, corpus_seed), build_tokenizer(size, corpus_seed)
    where = f"seed={seed} vocab_size={size} corpus_seed={corpus_seed}"
    assert a.get_vocab() == b.get_vocab(), where
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str(), where
    assert a.chat_template == b.chat_template


def test_build_is_identical_in_another_process(tok):
    """Different interpreter and hash seed: catches dict/set-order dependence."""
    code = (
        "import hashlib; from posttrain.embedded import build_tokenizer; "
        "print(hashlib.sha256(build_tokenizer().backend_tokenizer.to_str().encode()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": str(random.SystemRandom().randrange(1, 2**32))}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == _fingerprint(tok)


def test_corpus_seed_changes_merges():
    assert _fingerprint(build_tokenizer(seed=0)) != _fingerprint(build_tokenizer(seed=1))


@pytest.mark.parametrize("vocab_size", [263, 300, 1024, 4096])
def test_len_within_vocab_size(vocab_size):
    t = build_tokenizer(vocab_size)
    assert len(t) <= vocab_size
    assert max(t.get_vocab().values()) == len(t) - 1  # ids are dense


def test_too_small_vocab_rejected():
    with pytest.raises(ValueError):
        build_tokenizer(262)


def test_build_time():
    start = time.perf_counter()
    build_tokenizer()
    assert time.perf_counter() - start < 2.0


def test_special_token_ids(tok):
    ids = {t: tok.convert_tokens_to_ids(t) for t in (BOS, EOS, PAD, USER, ASSISTANT, "<think>", "</think>")}
    assert ids == {BOS: 0, EOS: 1, PAD: 2, USER: 3, ASSISTANT: 4, "<think>": 5, "</think>": 6}
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS, EOS, PAD)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert set(tok.all_special_ids) == {0, 1, 2}
    # added tokens are atomic inside ordinary text
    text = f"a{USER}b{ASSISTANT}<think>c</think>d"
    ids_ = tok(text, add_special_tokens=False)["input_ids"]
    assert [i for i in ids_ if i < 7] == [3, 4, 5, 6]


def test_plain_encode_prepends_bos_only(tok):
    ids = tok("Compute 2 + 3.")["input_ids"]
    assert ids[0] == 0 and 1 not in ids


def test_skip_special_tokens_keeps_think_and_roles(tok):
    text = f"{BOS}{USER}q{ASSISTANT}<think>\nx\n</think>\ny{EOS}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == f"{USER}q{ASSISTANT}<think>\nx\n</think>\ny"
    assert tok.decode(ids) == text


def test_digits_are_single_tokens(tok):
    tokens = tok.tokenize("12345 * 678 = -8369910")
    assert [t for t in tokens if any(c.isdigit() for c in t)] == list("123456788369910"), tokens


def test_unicode_round_trip(tok, rng):
    r, seed = rng
    for _ in range(200):
        text = random_text(r)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text, f"seed={seed} text={text!r}"
        with_bos = tok(text)["input_ids"]
        assert with_bos == [0] + ids, f"seed={seed} text={text!r}"
        assert tok.decode(with_bos, skip_special_tokens=True) == text, f"seed={seed} text={text!r}"


def test_task_text_compresses(tok):
    """The BPE actually learned the domain: words become single tokens."""
    for word in ["Let me", " verify", " answer", " multiply", "Wait"]:
        assert len(tok.tokenize(word)) <= 2, (word, tok.tokenize(word))


TWO_TURNS = [
    {"role": "system", "content": "You are a careful solver."},
    {"role": "user", "content": "Compute 2 + 3."},
    {"role": "assistant", "content": "<think>\n2 + 3 = 5\n</think>\nThe answer is \\boxed{5}."},
    {"role": "user", "content": "Now double it."},
    {"role": "assistant", "content": "<think>\n5 * 2 = 10\n</think>\n\\boxed{10}"},
]


def test_chat_template_string(tok):
    expected = (
        "<｜begin▁of▁sentence｜>You are a careful solver."
        "<｜User｜>Compute 2 + 3."
        "<｜Assistant｜><think>\n2 + 3 = 5\n</think>\nThe answer is \\boxed{5}.<｜end▁of▁sentence｜>"
        "<｜User｜>Now double it."
        "<｜Assistant｜><think>\n5 * 2 = 10\n</think>\n\\boxed{10}<｜end▁of▁sentence｜>"
    )
    assert tok.apply_chat_template(TWO_TURNS, tokenize=False) == expected
    prompt = tok.apply_chat_template(TWO_TURNS[:4], tokenize=False, add_generation_prompt=True)
    assert prompt == expected[: expected.index("<｜User｜>Now")] + "<｜User｜>Now double it.<｜Assistant｜>"
    no_system = tok.apply_chat_template(TWO_TURNS[1:2], tokenize=False, add_generation_prompt=True)
    assert no_system == "<｜begin▁of▁sentence｜><｜User｜>Compute 2 + 3.<｜Assistant｜>"


def test_multiple_system_messages_joined(tok):
    msgs = [{"role": "system", "content": "A"}, {"role": "system", "content": "B"}, {"role": "user", "content": "q"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == f"{BOS}A\n\nB{USER}q"


def test_unknown_role_rejected(tok):
    with pytest.raises(Exception, match="Unsupported role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _assert_mask_exact(tok, messages, where=""):
    """Masked spans must be exactly each assistant content + eos; nothing else."""
    out = tok.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(mask) == len(ids), where
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ids) == rendered, where
    targets = [m["content"] + EOS for m in messages if m["role"] == "assistant"]
    assert [tok.decode(ids[a:b]) for a, b in _runs(mask)] == targets, where
    # the unmasked tokens are the rendered text with those spans cut out
    rest, cursor = [], 0
    for target in targets:
        at = rendered.index(target, cursor)
        rest.append(rendered[cursor:at])
        cursor = at + len(target)
    rest.append(rendered[cursor:])
    unmasked = [tok.decode(ids[a:b]) for a, b in _runs([1 - m for m in mask])]
    assert unmasked == [piece for piece in rest if piece], where
    return ids, mask


def test_assistant_mask_two_turns(tok):
    ids, mask = _assert_mask_exact(tok, TWO_TURNS)
    assert mask[-1] == 1 and ids[-1] == 1  # final eos is trained on
    assert mask[ids.index(4)] == 0  # the <｜Assistant｜> header is not


def test_assistant_mask_random_contents(tok, rng):
    r, seed = rng
    for problem in make_problems(20, seed=seed):
        messages = [
            {"role": "user", "content": problem.question},
            {"role": "assistant", "content": "<think>\n" + "\n".join(problem.steps) + "\n</think>\n" + random_text(r)},
            {"role": "user", "content": random_text(r, 20)},
            {"role": "assistant", "content": random_text(r) + f"\\boxed{{{problem.answer}}}"},
        ]
        _assert_mask_exact(tok, messages, f"seed={seed} {messages!r}")


def test_save_load_identical(tok, tmp_path, rng):
    r, seed = rng
    path = save_tokenizer(tok, tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(path)
    assert len(loaded) == len(tok)
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert loaded.chat_template == tok.chat_template
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (0, 1, 2)
    texts = [random_text(r) for _ in range(50)] + [p.question for p in make_problems(20, seed=seed)]
    for text in texts:
        for special in (True, False):
            assert loaded(text, add_special_tokens=special)["input_ids"] == tok(
                text, add_special_tokens=special
            )["input_ids"], f"seed={seed} text={text!r}"
        ids = tok(text)["input_ids"]
        assert loaded.decode(ids, skip_special_tokens=True) == text, f"seed={seed}"
    a = tok.apply_chat_template(TWO_TURNS, return_assistant_tokens_mask=True, return_dict=True)
    b = loaded.apply_chat_template(TWO_TURNS, return_assistant_tokens_mask=True, return_dict=True)
    assert (a["input_ids"], a["assistant_masks"]) == (b["input_ids"], b["assistant_masks"])
