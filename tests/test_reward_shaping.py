"""Format and shaping rewards, the registry, and combination, called as TRL calls them."""

import math

import pytest

import reward


def test_registry_names_and_unknown_reward():
    assert {"math", "code", "format", "overlong", "repetition", "language", "cosine"} <= set(reward.available())
    with pytest.raises(KeyError, match="unknown reward 'maths'"):
        reward.get("maths")
    assert reward.get("format").__name__ == "format"


def test_think_format():
    fmt = reward.get("format")
    completions = ["<think>step</think>\nanswer", "<think>step</think>", "answer only", "<think>a</think>b<think>c</think>d",
                   [{"role": "assistant", "content": "<think>x</think> y"}]]
    assert fmt(None, completions) == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert reward.get("format", opened_by_prompt=True)(None, ["reasoning</think> answer"]) == [1.0]


def test_overlong_penalty_follows_dapo_with_token_ids():
    pen = reward.get("overlong", max_length=100, cache_length=20)
    ids = [[0] * n for n in (50, 80, 90, 100, 101)]
    assert pen(None, ["x"] * 5, completion_ids=ids) == [0.0, 0.0, -0.5, -1.0, -1.0]


def test_repetition_penalty():
    rep = reward.get("repetition", ngram=2, max_penalty=1.0)
    looped, fresh = rep(None, ["a b a b a b a b", "one two three four five"])
    assert looped == pytest.approx(-(1 - 2 / 7)) and fresh == 0.0


def test_language_consistency_share_of_target_script():
    lang = reward.get("language")
    mixed, chinese, english = lang(None, ["<think>we need 计算 this</think>ok", "<think>我们需要计算</think>",
                                          "<think>all english words</think>"])
    assert mixed == pytest.approx(3 / 5) and chinese == 0.0 and english == 1.0
    assert lang(None, ["<think>我们需要计算</think>"], language=["zh"]) == [1.0]


def test_cosine_length_scaling():
    cos = reward.get("cosine", max_length=100)
    out = cos(None, ["\\boxed{4}", "\\boxed{4}" + " " * 91, "\\boxed{5}", "\\boxed{5}" + " " * 91, "\\boxed{4}"],
              answer=["4", "4", "4", "4", None])
    assert out[0] == pytest.approx(0.5 + 0.25 * (1 + math.cos(math.pi * 0.09)))
    assert out[0] > out[1] >= 0.5          # correct: shorter is better
    assert out[2] < out[3] <= -0.5         # wrong: shorter is punished more
    assert out[4] is None


def test_combine_weights_and_skips_not_applicable():
    mix = reward.combine({"math": 1.0, "format": 0.5})
    out = mix(None, ["<think>x</think>\\boxed{2}", "\\boxed{3}", "<think>x</think>\\boxed{2}"], answer=["2", "2", None])
    assert out == [1.5, 0.0, 0.5]
    assert mix.__name__ == "math+format"


def test_trl_style_call_with_extra_kwargs():
    """TRL passes every dataset column plus trainer bookkeeping; unknown ones are ignored."""
    scores = reward.get("math")(prompts=["q"], completions=["\\boxed{1}"], answer=["1"], completion_ids=[[1, 2]],
                                trainer_state=object(), problem=["q"])
    assert scores == [1.0]


def test_column_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2 completions"):
        reward.get("math")(None, ["a", "b"], answer=["1"])
