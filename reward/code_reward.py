"""Code reward: run a completion's code against its tests in the sandbox; score = fraction passed.

Test formats, chosen per sample from the columns present:
  * HumanEval: `test` (defines `check(candidate)`) + `entry_point`; a completion that only
    continues the function body is prefixed with the code prompt (`code_prompt` column, or
    the prompt itself when it is a string that defines the entry point);
  * MBPP: `test_list` of assert lines (+ optional `test_setup_code`, `test_imports`);
  * stdin/stdout: `inputs` and `outputs` lists, one program run per case, output compared
    line by line with trailing whitespace ignored.
A sample with none of them scores None (not applicable). The code is the last fenced
```python block of the answer (the text after </think> when `ignore_think`), or the whole
answer when it has no fence.
"""

from __future__ import annotations

import re
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import code_harness
from .sandbox import Sandbox, SandboxLimits
from .text import column, completion_text, split_think

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)


@dataclass
class CodeResult:
    score: float | None
    passed: int = 0
    total: int = 0
    reason: str = ""                 # first failure, or "all tests passed"
    failures: list[str] = field(default_factory=list)


def extract_code(text: str, ignore_think: bool = True) -> str | None:
    if ignore_think:
        reasoning, text = split_think(text)
        if reasoning is not None and not text.strip():
            return None
    blocks = _FENCE.findall(text)
    python_blocks = [code for lang, code in blocks if lang.lower() in ("python", "py", "python3")]
    if python_blocks:
        return python_blocks[-1]
    if blocks:
        return blocks[-1][1]
    return text if text.strip() else None


def _normalize_output(s: str) -> list[str]:
    lines = [line.rstrip() for line in s.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


_default_sandbox: Sandbox | None = None
_default_lock = threading.Lock()


def default_sandbox() -> Sandbox:
    global _default_sandbox
    with _default_lock:
        if _default_sandbox is None:
            _default_sandbox = Sandbox()
        return _default_sandbox


class CodeReward:
    """TRL-signature reward over the sandbox."""

    def __init__(self, limits: SandboxLimits | None = None, sandbox: Sandbox | None = None,
                 ignore_think: bool = True, max_parallel: int | None = None):
        self.__name__ = "code"
        self.limits = limits or SandboxLimits(wall_s=10.0, cpu_s=10)
        self._sandbox = sandbox
        self.ignore_think = ignore_think
        self.max_parallel = max_parallel

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            self._sandbox = default_sandbox()
        return self._sandbox

    def __call__(self, prompts=None, completions=None, **columns) -> list[float | None]:
        return [r.score for r in self.score_detailed(prompts, completions, **columns)]

    def explain(self, prompts=None, completions=None, **columns) -> list[tuple[float | None, str]]:
        """(score, reason) per completion, for reports and rejects files."""
        return [(r.score, r.reason) for r in self.score_detailed(prompts, completions, **columns)]

    def score_detailed(self, prompts, completions, **columns) -> list[CodeResult]:
        n = len(completions)
        prompts = list(prompts) if prompts is not None else [None] * n
        cols = {k: column(columns, k, n) for k in ("test", "entry_point", "code_prompt", "test_list",
                                                   "test_setup_code", "test_imports", "inputs", "outputs")}
        workers = self.max_parallel or self.sandbox.max_parallel
        with ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(self._one, prompts[i], completions[i], {k: v[i] for k, v in cols.items()}, pool)
                       for i in range(n)]
            return [f.result() for f in futures]

    # ----------------------------------------------------------------- one sample
    def _one(self, prompt, completion, row: dict, pool) -> CodeResult:
        try:
            code = extract_code(completion_text(completion), self.ignore_think)
        except TypeError as e:
            return CodeResult(0.0, reason=str(e))
        if row["test"] is not None and row["entry_point"]:
            kind = "humaneval"
        elif row["test_list"]:
            kind = "mbpp"
        elif row["inputs"] is not None and row["outputs"] is not None:
            kind = "stdio"
        else:
            return CodeResult(None, reason="no tests for this sample")
        if code is None:
            return CodeResult(0.0, reason="no code in the answer (think block not closed or empty)")
        if kind == "stdio":
            return self._stdio(code, row, pool)
        return self._asserts(code, prompt, row, kind)

    def _asserts(self, code: str, prompt, row: dict, kind: str) -> CodeResult:
        if kind == "humaneval":
            entry = row["entry_point"]
            prefix = row["code_prompt"] or (prompt if isinstance(prompt, str) else None)
            if not re.search(rf"\bdef\s+{re.escape(entry)}\s*\(", code) and prefix:
                code = prefix + code  # a body continuation of the prompt's signature
            try:
                tests, n = code_harness.instrument(row["test"], "check")
            except (SyntaxError, ValueError) as e:
                return CodeResult(None, reason=f"unusable tests: {e}")
            harness = code_harness.harness_source("check", entry)
        else:
            source = code_harness.mbpp_check_source(row["test_list"], row["test_setup_code"] or "",
                                                    row["test_imports"])
            try:
                tests, n = code_harness.instrument(source, "__pt_check")
            except (SyntaxError, ValueError) as e:
                return CodeResult(None, reason=f"unusable tests: {e}")
            harness = code_harness.harness_source("__pt_check", None)
        n_tests = max(n, 1)
        nonce = secrets.token_hex(16)
        run = self.sandbox.run({"solution.py": code, "tests.py": tests, "harness.py": harness},
                               ["harness.py"], stdin=nonce + "\n", limits=self.limits)
        passed, failures, done, setup = code_harness.parse_report(run.report, nonce, n_tests)
        if n == 0 and done:  # tests without asserts: finishing is passing
            passed = [True]
        k = sum(passed)
        problem = run.failure_reason()
        if setup:
            failures.insert(0, setup)
        if problem:
            failures.insert(0, problem)
        elif not done and not setup:
            failures.insert(0, "the program ended before the tests finished (no report)")
        reason = "all tests passed" if k == n_tests and not failures else (failures[0] if failures else "tests failed")
        return CodeResult(k / n_tests, k, n_tests, reason, failures[:20])

    def _stdio(self, code: str, row: dict, pool) -> CodeResult:
        inputs, outputs = row["inputs"], row["outputs"]
        if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs) or not inputs:
            return CodeResult(None, reason="inputs/outputs must be two non-empty lists of equal length")

        def case(i: int) -> str | None:
            run = self.sandbox.run({"solution.py": code}, ["solution.py"], stdin=str(inputs[i]), limits=self.limits)
            problem = run.failure_reason()
            if problem:
                return f"case {i}: {problem}"
            if _normalize_output(run.stdout) != _normalize_output(str(outputs[i])):
                return f"case {i}: wrong answer"
            return None

        # cases run on the sandbox's slots directly (not nested in the caller's thread pool)
        with ThreadPoolExecutor(min(len(inputs), self.sandbox.max_parallel)) as cases:
            failures = [f for f in cases.map(case, range(len(inputs))) if f]
        k = len(inputs) - len(failures)
        return CodeResult(k / len(inputs), k, len(inputs), failures[0] if failures else "all tests passed", failures[:20])
