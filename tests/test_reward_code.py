"""Code reward on HumanEval, MBPP-style and stdin/stdout tests."""

import gzip
import json

import pytest

import reward
from reward.code_reward import extract_code

@pytest.fixture(scope="module")
def humaneval(shared_data):
    return [json.loads(line) for line in gzip.open(shared_data / "humaneval.jsonl.gz", "rt")]


@pytest.fixture(scope="module")
def code_reward():
    return reward.get("code")


def _cols(rows):
    return dict(test=[r["test"] for r in rows], entry_point=[r["entry_point"] for r in rows])


def test_all_canonical_humaneval_solutions_pass(humaneval, code_reward):
    results = code_reward.score_detailed([r["prompt"] for r in humaneval], [r["canonical_solution"] for r in humaneval],
                                         **_cols(humaneval))
    assert len(results) == 164
    failing = [(r["task_id"], x.reason) for r, x in zip(humaneval, results) if x.score != 1.0]
    assert failing == []
    assert sum(x.total for x in results) > 164 * 3  # asserts are counted one by one


@pytest.mark.parametrize("body", ["    pass\n", "    return None\n"])
def test_stub_bodies_fail(humaneval, code_reward, body):
    scores = code_reward([r["prompt"] for r in humaneval], [body] * len(humaneval), **_cols(humaneval))
    assert sum(s < 1.0 for s in scores) >= 0.95 * len(humaneval)


def test_full_program_in_a_fence_after_think(humaneval, code_reward):
    task = humaneval[0]
    answer = ("<think>I will loop over pairs.</think>\nHere it is:\n```python\n"
              + task["prompt"] + task["canonical_solution"] + "```\n")
    assert code_reward([None], [answer], **_cols([task])) == [1.0]
    wrong = answer.replace("return True", "return False")
    assert code_reward([None], [wrong], **_cols([task]))[0] < 1.0


def test_fraction_of_tests_passed_and_reasons(code_reward):
    tests = "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(2) == 3\n    assert candidate(3) == 5\n"
    [res] = code_reward.score_detailed([None], ["def inc(x):\n    return x + 1\n"], test=[tests], entry_point=["inc"])
    assert res.score == pytest.approx(2 / 3) and res.passed == 2 and res.total == 3
    assert "test 2" in res.reason


def test_mbpp_style_test_list(code_reward):
    code = "def remove_Occ(s, ch):\n    return s.replace(ch, '')\n"
    tests = ['assert remove_Occ("hello","l") == "heo"', 'assert remove_Occ("abcda","a") == "bcd"',
             'assert remove_Occ("PHP","P") == "H"']
    assert code_reward([None], [code], test_list=[tests]) == [1.0]
    assert code_reward([None], ["def remove_Occ(s, ch):\n    return s\n"], test_list=[tests]) == [0.0]


def test_stdin_stdout_cases(code_reward):
    code = "n = int(input())\nprint(sum(range(n + 1)))\n"
    cols = dict(inputs=[["3\n", "10\n", "0\n"]], outputs=[["6\n", "55", "1\n"]])
    [res] = code_reward.score_detailed([None], [code], **cols)
    assert res.score == pytest.approx(2 / 3) and "case 2: wrong answer" in res.reason


def test_samples_without_tests_are_not_applicable(code_reward):
    assert code_reward([None, None], ["print(1)", "x"], test=[None, None]) == [None, None]


def test_extract_code_prefers_the_last_python_fence():
    text = "```\nnot this\n```\n```python\nfirst\n```\ntext\n```python\nsecond\n```"
    assert extract_code(text) == "second\n"
    assert extract_code("<think>```python\nx\n```") is None
    assert extract_code("plain code") == "plain code"


@pytest.mark.parametrize("cols,why", [
    (dict(test=[7], entry_point=["f"]), "'test' and 'entry_point' must be strings"),
    (dict(test=["def check(c):\n    assert c() == 1\n"], entry_point=["not a name"]), "is not a Python name"),
    (dict(test=["def check(c) oops"], entry_point=["f"]), "unusable tests"),
    (dict(test=["assert True\n"], entry_point=["f"]), "the tests define no function 'check'"),
    (dict(test_list=[["assert f() == 1", 3]]), "'test_list' must be a list of strings"),
    (dict(inputs=[["1"]], outputs=[["1", "2"]]), "inputs/outputs must be two non-empty lists"),
    (dict(inputs=[[1]], outputs=[[1]]), "inputs/outputs must hold strings"),
])
def test_unusable_tests_are_not_applicable_with_a_reason(code_reward, cols, why):
    [res] = code_reward.score_detailed([None], ["def f():\n    return 1\n"], **cols)
    assert res.score is None and "unusable tests" in res.reason and why in res.reason, res


def test_exceptions_cross_as_builtin_types(code_reward):
    tests = ("def check(candidate):\n    try:\n        candidate(-1)\n    except ValueError:\n        pass\n"
             "    else:\n        assert False\n    assert candidate(4) == 2\n")
    code = "def root(x):\n    if x < 0:\n        raise ValueError('negative')\n    return int(x ** 0.5)\n"
    assert code_reward([None], [code], test=[tests], entry_point=["root"]) == [1.0]
    wrong = code.replace("ValueError", "KeyError")
    assert code_reward([None], [wrong], test=[tests], entry_point=["root"]) == [0.5]


def test_in_place_tasks_see_the_mutated_argument(code_reward):
    tests = "def check(candidate):\n    xs = [3, 1, 2]\n    candidate(xs)\n    assert xs == [1, 2, 3]\n"
    assert code_reward([None], ["def sort_in_place(xs):\n    xs.sort()\n"], test=[tests],
                       entry_point=["sort_in_place"]) == [1.0]
    assert code_reward([None], ["def sort_in_place(xs):\n    return sorted(xs)\n"], test=[tests],
                       entry_point=["sort_in_place"]) == [0.0]


def test_mbpp_setup_code_and_names_resolved_from_the_solution(code_reward):
    tests = ["assert area(Box(2, 3)) == 6", "assert PI_ISH == 3"]
    setup = "class Box:\n    def __init__(self, w, h):\n        self.w, self.h = w, h\n"
    # the tests' own objects are not plain data: a solution cannot be handed one
    [res] = code_reward.score_detailed([None], ["def area(b):\n    return b.w * b.h\nPI_ISH = 3\n"],
                                       test_list=[tests], test_setup_code=[setup])
    assert (res.passed, res.total) == (1, 2) and "not plain data" in res.reason, res
    [res] = code_reward.score_detailed([None], ["PI_ISH = 3\n"], test_list=[["assert PI_ISH == 3"]])
    assert res.score == 1.0, res


def test_helpers_come_from_the_task_not_the_solution(code_reward):
    prompt = "def double(x):\n    return 2 * x\n\n\ndef quad(x):\n    \"\"\"Four times x.\"\"\"\n"
    tests = "def check(candidate):\n    assert candidate(3) == double(double(3))\n"
    honest = "    return double(double(x))\n"
    cheat = "def double(x):\n    return 0\n\n\ndef quad(x):\n    return 0\n"
    assert code_reward([prompt, prompt], [honest, cheat], test=[tests] * 2, entry_point=["quad"] * 2) == [1.0, 0.0]


FORGED_BODIES = {
    # a growing counter of fake "pass" lines in the messages of raised exceptions
    "report_injection": ("    import builtins\n    c = getattr(builtins, '_c', 0); builtins._c = c + 1\n"
                         "    raise ValueError(''.join('\\rpass %d' % i for i in range(c * 36, c * 36 + 36)) + '\\rdone')\n"),
    # fails every real assert; HumanEval's `assert True, ...` filler must not count as passed tests
    "fails_everything": "    raise RuntimeError('no')\n",
}


@pytest.mark.parametrize("name", sorted(FORGED_BODIES))
def test_forged_bodies_score_zero_on_all_of_humaneval(humaneval, code_reward, name):
    scores = code_reward([r["prompt"] for r in humaneval], [FORGED_BODIES[name]] * len(humaneval), **_cols(humaneval))
    assert [(r["task_id"], s) for r, s in zip(humaneval, scores) if s != 0.0] == []
