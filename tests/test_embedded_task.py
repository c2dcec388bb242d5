"""Tests for the synthetic arithmetic task.

Answers are re-derived here by an evaluator written independently of the
generator (Python's ``ast`` restricted to + - * and exact /, plus a small
parser for the worded chains), so a generator bug cannot hide behind itself.
Fresh random seeds are used on every run; the seed is in every failure message.
"""

from __future__ import annotations

import ast
import random
import re
from fractions import Fraction

import pytest

from posttrain.embedded import ArithmeticProblem, make_problems

STEP_RE = re.compile(r"^(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)$")
CHAIN_RE = re.compile(r"^(?:Start with|Begin with|Take the number) (\d+)\. (.+)\. What [^?]*\?$")
CLAUSE_RE = re.compile(r"^(add|subtract|multiply by|divide by) (\d+)$")
EXPR_RE = re.compile(r"^(?:Compute|What is|Evaluate|Calculate) ([\d ()+*/-]+)[.?]$")


def _exact(op: str, a: Fraction, b: Fraction) -> Fraction:
    if op == "/":
        assert b != 0, "division by zero"
        q = a / b
        assert q.denominator == 1, f"inexact division {a} / {b}"
        return q
    return {"+": a + b, "-": a - b, "*": a * b}[op]


_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def _eval_ast(node: ast.AST, values: list[Fraction]) -> Fraction:
    """Evaluate literals and + - * / only; records every intermediate value."""
    if isinstance(node, ast.Expression):
        return _eval_ast(node.body, values)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
        result = _exact(_AST_OPS[type(node.op)], _eval_ast(node.left, values), _eval_ast(node.right, values))
        values.append(result)
        return result
    raise AssertionError(f"disallowed syntax: {ast.dump(node)}")


def evaluate_question(question: str) -> tuple[int, int, list[int], list[int]]:
    """Return (answer, number of operations, literal operands, intermediate values)."""
    if m := EXPR_RE.match(question):
        expr = m.group(1)
        values: list[Fraction] = []
        result = _eval_ast(ast.parse(expr, mode="eval"), values)
        literals = [int(x) for x in re.findall(r"\d+", expr)]
        return int(result), len(values), literals, [int(v) for v in values]
    if m := CHAIN_RE.match(question):
        value = Fraction(int(m.group(1)))
        literals, values = [int(m.group(1))], []
        clauses = m.group(2).split(", then ")
        for clause in clauses:
            c = CLAUSE_RE.match(clause[0].lower() + clause[1:])
            assert c, f"unparsable clause {clause!r} in {question!r}"
            op = {"add": "+", "subtract": "-", "multiply by": "*", "divide by": "/"}[c.group(1)]
            literals.append(int(c.group(2)))
            value = _exact(op, value, Fraction(int(c.group(2))))
            values.append(int(value))
        return int(value), len(clauses), literals, values
    raise AssertionError(f"question matches no known form: {question!r}")


@pytest.fixture
def seed() -> int:
    return random.SystemRandom().randrange(10**9)


def test_same_seed_same_problems_and_prefix_stable(seed):
    a = make_problems(60, seed=seed)
    assert a == make_problems(60, seed=seed), f"seed={seed}"
    assert make_problems(25, seed=seed) == a[:25], f"seed={seed}"
    assert a != make_problems(60, seed=seed + 1), f"seed={seed}"


def test_ids_unique_and_stable(seed):
    problems = make_problems(200, seed=seed)
    assert [p.id for p in problems] == [f"arith-{seed}-{i}" for i in range(200)]
    assert all(isinstance(p, ArithmeticProblem) for p in problems)
    with pytest.raises(AttributeError):
        problems[0].answer = "0"  # frozen


@pytest.mark.parametrize("min_ops,max_ops", [(2, 4), (1, 1), (3, 6)])
def test_answers_match_independent_evaluation(seed, min_ops, max_ops):
    problems = make_problems(300, seed=seed, min_ops=min_ops, max_ops=max_ops)
    for p in problems:
        where = f"seed={seed} {p}"
        answer, n_ops, literals, values = evaluate_question(p.question)
        assert p.answer == str(answer), where
        assert min_ops <= n_ops <= max_ops, where
        assert len(p.steps) == n_ops, where
        assert all(1 <= x <= 99 for x in literals), where
        assert all(abs(v) <= 10**5 for v in values), where
        assert sorted(values) == sorted(int(STEP_RE.match(s).group(4)) for s in p.steps), where


def test_steps_are_correct_and_chain_to_answer(seed):
    for p in make_problems(300, seed=seed):
        where = f"seed={seed} {p}"
        _, _, literals, _ = evaluate_question(p.question)
        results: list[int] = []
        for step in p.steps:
            m = STEP_RE.match(step)
            assert m, where
            a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            assert _exact(op, Fraction(a), Fraction(b)) == c, where
            # each operand is given in the question or computed by an earlier step
            assert all(x in literals or x in results for x in (a, b)), where
            results.append(c)
        assert str(results[-1]) == p.answer, where


def test_both_surface_forms_and_division_occur(seed):
    problems = make_problems(300, seed=seed)
    assert any(EXPR_RE.match(p.question) for p in problems), f"seed={seed}"
    assert any(CHAIN_RE.match(p.question) for p in problems), f"seed={seed}"
    assert any(" / " in s for p in problems for s in p.steps), f"seed={seed}"


def test_evaluator_rejects_wrong_answers():
    """Guards the guard: the independent evaluator must notice a corrupted problem."""
    p = make_problems(1, seed=7)[0]
    answer, *_ = evaluate_question(p.question)
    assert str(answer) == p.answer
    with pytest.raises(AssertionError):
        evaluate_question("Compute 2 ** 3.")
    assert evaluate_question("Compute (17 + 25) * 3 - 8.")[0] == 118
    assert evaluate_question("Start with 12. Add 7, then multiply by 3, then subtract 5. What is the result?")[0] == 52


@pytest.mark.parametrize("kwargs", [dict(n=-1), dict(n=3, min_ops=0), dict(n=3, min_ops=4, max_ops=2)])
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        make_problems(**kwargs)


def test_zero_problems():
    assert make_problems(0) == []
