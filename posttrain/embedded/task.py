"""Deterministic synthetic multi-step arithmetic task for the embedded default.

The embedded pipeline must run offline, so it needs a task that is generated
locally and whose answers a rule can check (no judge model, no dataset
download).  Multi-step integer arithmetic fits: every problem carries the exact
intermediate computations a reasoner would write, so SFT traces can be built
from ``steps`` and RL rewards from ``answer``.

Two surface forms are produced so a model cannot learn a single template:

* expressions with minimal parentheses, e.g. ``Compute (17 + 25) * 3 - 8.``
* lightly worded chains, e.g. ``Start with 12. Add 7, then multiply by 3,
  then subtract 5. What is the result?``

Numbers are kept small (operands 1..99, multipliers/divisors 2..12, every
intermediate within +-10**5, division only when exact) so a tiny model can
actually learn the task.  Everything is drawn from one ``random.Random(seed)``
stream, so the same arguments always give the same problems and
``make_problems(n)`` is a prefix of ``make_problems(m)`` for ``n <= m``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

MAX_ABS = 10**5
"""Bound on every intermediate value; keeps numbers short in tokens."""

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_EXPR_PREFIXES = ("Compute {}.", "What is {}?", "Evaluate {}.", "Calculate {}.")
_CHAIN_STARTS = ("Start with {}.", "Begin with {}.", "Take the number {}.")
_CHAIN_ENDS = ("What is the result?", "What number do you get?", "What is the final value?")
_CHAIN_VERBS = {"+": "add {}", "-": "subtract {}", "*": "multiply by {}", "/": "divide by {}"}


@dataclass(frozen=True)
class ArithmeticProblem:
    """One problem; ``steps`` are the correct intermediate computations in order."""

    id: str
    question: str
    answer: str
    steps: tuple[str, ...]


@dataclass(frozen=True)
class _Node:
    """Expression tree node: a leaf when ``op`` is None, else ``left op right``."""

    value: int
    op: str | None = None
    left: _Node | None = None
    right: _Node | None = None


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        if b == 0 or a % b:
            raise ValueError(f"inexact division {a} / {b}")
        return a // b
    raise ValueError(f"unknown operator {op!r}")


def _operand(rng: random.Random, op: str, max_operand: int = 99) -> int:
    """Small factors for * and / keep products in range and learnable."""
    return rng.randint(2, min(12, max(2, max_operand))) if op in "*/" else rng.randint(1, max_operand)


def _divisor(rng: random.Random, value: int, max_operand: int = 99) -> int | None:
    """A divisor in 2..12 (and <= max_operand) of ``value`` that makes the division exact, if any."""
    choices = [d for d in range(2, min(12, max(2, max_operand)) + 1) if value % d == 0]
    return rng.choice(choices) if choices else None


def _step(op: str, a: int, b: int, result: int) -> str:
    return f"{a} {op} {b} = {result}"


def _random_tree(rng: random.Random, n_ops: int, parent_op: str = "+", max_operand: int = 99) -> _Node:
    """Random expression with exactly ``n_ops`` operators (any tree shape)."""
    if n_ops == 0:
        return _Node(_operand(rng, parent_op, max_operand))
    op = rng.choice("+-*+-*/")
    if op == "/":
        # Division only by a leaf that divides the left value exactly.
        left = _random_tree(rng, n_ops - 1, "+", max_operand)
        d = _divisor(rng, left.value, max_operand)
        if d is not None and left.value != 0:
            return _Node(left.value // d, "/", left, _Node(d))
        op = rng.choice("+-*")
        right = _Node(_operand(rng, op, max_operand))
    else:
        k = rng.randint(0, n_ops - 1)
        left = _random_tree(rng, k, op, max_operand)
        right = _random_tree(rng, n_ops - 1 - k, op, max_operand)
    return _Node(_apply(op, left.value, right.value), op, left, right)


def _render(node: _Node, parent_prec: int = 0, is_right: bool = False) -> str:
    """Minimal-parentheses infix.  A right child of equal precedence is always
    parenthesised so the written order matches the tree (and the steps)."""
    if node.op is None:
        return str(node.value)
    prec = _PRECEDENCE[node.op]
    text = f"{_render(node.left, prec)} {node.op} {_render(node.right, prec, True)}"
    if prec < parent_prec or (is_right and prec == parent_prec):
        return f"({text})"
    return text


def _tree_steps(node: _Node) -> list[str]:
    """Post-order: the order a reasoner resolves parentheses and precedence."""
    if node.op is None:
        return []
    steps = _tree_steps(node.left) + _tree_steps(node.right)
    steps.append(_step(node.op, node.left.value, node.right.value, node.value))
    return steps


def _tree_values(node: _Node) -> list[int]:
    if node.op is None:
        return [node.value]
    return _tree_values(node.left) + _tree_values(node.right) + [node.value]


def _expression_problem(rng: random.Random, n_ops: int, max_operand: int = 99) -> tuple[str, int, list[str]]:
    while True:  # rejection keeps every intermediate within MAX_ABS
        tree = _random_tree(rng, n_ops, "+", max_operand)
        if all(abs(v) <= MAX_ABS for v in _tree_values(tree)):
            break
    question = rng.choice(_EXPR_PREFIXES).format(_render(tree))
    return question, tree.value, _tree_steps(tree)


def _chain_problem(rng: random.Random, n_ops: int, max_operand: int = 99) -> tuple[str, int, list[str]]:
    value = rng.randint(1, max_operand)
    start = value
    clauses: list[str] = []
    steps: list[str] = []
    while len(steps) < n_ops:
        op = rng.choice("+-*+-*/")
        b = _divisor(rng, value, max_operand) if op == "/" else _operand(rng, op, max_operand)
        if op == "/" and (b is None or value == 0):
            continue
        result = _apply(op, value, b)
        if abs(result) > MAX_ABS:
            continue
        clauses.append(_CHAIN_VERBS[op].format(b))
        steps.append(_step(op, value, b, result))
        value = result
    body = ", then ".join(clauses)
    question = " ".join(
        (rng.choice(_CHAIN_STARTS).format(start), body[0].upper() + body[1:] + ".", rng.choice(_CHAIN_ENDS))
    )
    return question, value, steps


def make_problems(n: int, seed: int = 0, min_ops: int = 2, max_ops: int = 4,
                  max_operand: int = 99) -> list[ArithmeticProblem]:
    """``n`` problems with ``min_ops..max_ops`` operations each, reproducible from ``seed``.

    ``max_operand`` bounds the operands (and the start of a chain); 9 gives single-digit
    problems a tiny model can learn on a CPU in minutes (the demo's SFT level).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= min_ops <= max_ops:
        raise ValueError(f"need 1 <= min_ops <= max_ops, got {min_ops}, {max_ops}")
    if max_operand < 2:
        raise ValueError(f"max_operand must be >= 2, got {max_operand}")
    rng = random.Random(seed)
    problems = []
    for i in range(n):
        n_ops = rng.randint(min_ops, max_ops)
        make = _expression_problem if rng.random() < 0.5 else _chain_problem
        question, answer, steps = make(rng, n_ops, max_operand)
        problems.append(ArithmeticProblem(f"arith-{seed}-{i}", question, str(answer), tuple(steps)))
    return problems
