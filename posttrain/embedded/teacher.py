"""A scripted R1-style teacher for the synthetic arithmetic task, behind the Engine interface.

It reads the problem from the prompt's last user message, solves it step by step, and
writes a long chain of thought with reflection and verification, the way R1 does. Like a
real teacher it is imperfect, drawn per sample from the sample's seed:
  * an arithmetic slip in one step, which it sometimes catches ("Wait, that's not right...")
    and sometimes carries through to a wrong final answer;
  * a trace cut off by the token limit (no closing </think>, finish_reason "length");
  * a line or two in another language (language mixing);
  * a sentence repeated in a loop (repetition).
So the distillation filters have real work. Temperature 0 gives the clean, correct trace.
"""

from __future__ import annotations

import ast
import random
import re
import time

from posttrain.engines.base import (Engine, Prompt, Sample, SamplingConfig, refuse_routed_experts, resolve_seeds,
                                    sample_seed)

_EXPR = re.compile(r"^(?:Compute|What is|Evaluate|Calculate)\s+(.+?)[.?]\s*$")
_CHAIN_START = re.compile(r"^(?:Start with|Begin with|Take the number)\s+(-?\d+)\.\s*(.*)$")
_CHAIN_STEP = re.compile(r"(add|subtract|multiply by|divide by)\s+(-?\d+)", re.IGNORECASE)
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_VERB_OPS = {"add": "+", "subtract": "-", "multiply by": "*", "divide by": "/"}

OPENERS = ("Okay, let me work through this carefully, one operation at a time.",
           "Alright, I need to evaluate this step by step, respecting the order of operations.",
           "Let me break this problem down into single operations.")
VERIFY = ("Let me verify that: {s}. Yes, that checks out.", "Wait, let me double-check {s}. Correct.",
          "Hmm, let me recompute {s} to be sure. It holds.")
CATCH = "Wait, that's not right. {a} {op} {b} is actually {c}, not {wrong}. Let me redo this step.\n{a} {op} {b} = {c}."
MIXED = ("让我再检查一下这个计算。", "这一步看起来是对的。")
LOOP = "Let me check this again."


class UnsolvableError(ValueError):
    pass


def _apply(op: str, a: int, b: int) -> int:
    if op == "/":
        if b == 0 or a % b:
            raise UnsolvableError(f"{a} / {b} is not an exact integer division")
        return a // b
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def solve(question: str) -> list[tuple[int, str, int, int]]:
    """The task's steps (a, op, b, a op b) in the order the task writes them (post-order)."""
    question = question.strip()
    m = _CHAIN_START.match(question)
    if m:
        value, steps = int(m.group(1)), []
        for verb, num in _CHAIN_STEP.findall(m.group(2)):
            op = _VERB_OPS[verb.lower()]
            new = _apply(op, value, int(num))
            steps.append((value, op, int(num), new))
            value = new
        if not steps:
            raise UnsolvableError("no operations found")
        return steps
    m = _EXPR.match(question)
    if not m:
        raise UnsolvableError("not an arithmetic problem of the synthetic task")
    try:
        tree = ast.parse(m.group(1), mode="eval").body
    except SyntaxError as e:
        raise UnsolvableError(f"cannot parse the expression: {e.msg}") from None
    steps: list[tuple[int, str, int, int]] = []

    def walk(node) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = walk(node.left), walk(node.right)
            op = _OPS[type(node.op)]
            c = _apply(op, a, b)
            steps.append((a, op, b, c))
            return c
        raise UnsolvableError("only integers and + - * / are allowed")

    walk(tree)
    return steps


def _user_text(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


def _question(text: str) -> str:
    """The problem sentence(s): the user text before any instruction line."""
    return text.strip().split("\n")[0].strip()


def write_trace(steps, rng: random.Random | None) -> tuple[str, bool]:
    """An R1-style response; returns (text, finished). rng=None writes the clean trace."""
    r = rng or random.Random(0)
    clean = rng is None
    # draws happen in the same order for every trace, so one seed always gives one trace
    slip_at = r.randrange(len(steps)) if (not clean and r.random() < 0.35) else None
    caught = r.random() < 0.5
    mix = not clean and r.random() < 0.06
    loop = not clean and r.random() < 0.04
    lines = [r.choice(OPENERS)]
    wrong_of: dict[int, int] = {}  # true intermediate result -> the wrong value carried instead
    for k, (a, op, b, c) in enumerate(steps):
        true_c = c
        if wrong_of:  # an uncaught slip earlier: later steps build on the wrong value
            a, b = wrong_of.get(a, a), wrong_of.get(b, b)
            try:
                c = _apply(op, a, b)
            except UnsolvableError:
                c = a + b
            if c != true_c:
                wrong_of[true_c] = c
        prefix = "First, " if k == 0 else r.choice(("Then ", "Next, ", "Now ", "So "))
        if k == slip_at:
            wrong = c + r.choice((-10, -3, -2, -1, 1, 2, 3, 10))
            lines.append(f"{prefix}{a} {op} {b} = {wrong}.")
            if caught:
                lines.append(CATCH.format(a=a, op=op, b=b, c=c, wrong=wrong))
            else:
                wrong_of[true_c] = wrong
                continue
        else:
            lines.append(f"{prefix}{a} {op} {b} = {c}.")
        if r.random() < 0.5 or clean:
            lines.append(r.choice(VERIFY).format(s=f"{a} {op} {b} = {c}"))
        if mix and k == 0:
            lines.append(r.choice(MIXED))
        if loop and k == len(steps) // 2:
            lines += [LOOP] * 12
    final = wrong_of.get(steps[-1][3], steps[-1][3])
    lines.append(f"So the final result is {final}.")
    text = "<think>\n" + "\n".join(lines) + "\n</think>\n\n" + f"The answer is \\boxed{{{final}}}."
    if not clean and r.random() < 0.06:  # ran out of tokens mid-thought
        cut = r.randrange(len(text) // 3, 2 * len(text) // 3)
        return text[:cut], False
    return text, True


class ScriptedTeacher(Engine):
    """The embedded default's teacher; `latency_s` simulates a slow server per prompt."""

    name = "scripted-teacher"

    def __init__(self, tokenizer=None, latency_s: float = 0.0):
        self.tokenizer, self.latency_s = tokenizer, latency_s

    def describe(self) -> dict:
        return {"engine": self.name, "model": "scripted R1-style arithmetic teacher"}

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            return [ord(ch) for ch in text]  # stand-in ids: one per character
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, prompts: list[Prompt], sampling: SamplingConfig,
                 seeds: list[int] | None = None) -> list[list[Sample]]:
        sampling.validate()
        refuse_routed_experts(self.name, sampling)
        seeds = resolve_seeds(sampling, len(prompts), seeds)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        out = []
        for prompt, seed in zip(prompts, seeds):
            if self.latency_s:
                time.sleep(self.latency_s)
            try:
                steps = solve(_question(_user_text(prompt)))
            except UnsolvableError as e:
                text = f"<think>\nI cannot solve this: {e}.\n</think>\n\nI am unable to answer."
                out.append([Sample(text, self._encode(text), "stop") for _ in range(sampling.n)])
                continue
            samples = []
            for j in range(sampling.n):
                rng = None if sampling.temperature == 0 else random.Random(sample_seed(seed, j))
                text, finished = write_trace(steps, rng)
                ids = self._encode(text)
                if len(ids) > sampling.max_tokens:
                    ids, finished = ids[: sampling.max_tokens], False
                    text = self.tokenizer.decode(ids) if self.tokenizer is not None else "".join(map(chr, ids))
                if finished and eos is not None:
                    ids = ids + [eos]
                samples.append(Sample(text, ids, "stop" if finished else "length"))
            out.append(samples)
        return out
