"""Code reward: run a completion's code against its tests in the sandbox; score = fraction passed.

Test formats, chosen per sample from the columns present:
  * HumanEval: `test` (defines `check(candidate)`) + `entry_point`; a completion that only
    continues the function body is prefixed with the code prompt (`code_prompt` column, or
    the prompt itself when it is a string that defines the entry point);
  * MBPP: `test_list` of assert lines (+ optional `test_setup_code`, `test_imports`);
  * stdin/stdout: `inputs` and `outputs` lists, one program run per case, output compared
    line by line with trailing whitespace ignored.
A sample with none of them (or with tests that cannot be used) scores None (not
applicable). The code is the last fenced ```python block of the answer (the text after
</think> when `ignore_think`), or the whole answer when it has no fence.

Assert-style tests run in their own process and call the solution's process through plain
data (code_harness.py); stdin/stdout cases compare outputs here, outside the sandbox. The
sandbox's isolation level comes with every result, and the reward refuses to run on a
weakly isolated sandbox unless `allow_weak_isolation=True`.
"""

from __future__ import annotations

import marshal
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import code_harness
from .sandbox import Role, Sandbox, SandboxLimits, SandboxUnavailable, scrub
from .text import column, completion_text, split_think

_HERE = Path(__file__).parent
_PROGRAMS = {name: (_HERE / name).read_text() for name in
             ("plain_data.py", "code_solution_server.py", "code_test_runner.py")}

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)


@dataclass
class CodeResult:
    score: float | None
    passed: int = 0
    total: int = 0
    reason: str = ""                 # first failure, or "all tests passed"
    failures: list[str] = field(default_factory=list)
    isolation: str | None = None     # the sandbox's ("full" or "weak"); None when nothing ran


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


def _compiles(source: str | None) -> bool:
    if not isinstance(source, str) or not source.strip():
        return False
    try:
        compile(source, "<prompt>", "exec")
    except (SyntaxError, ValueError):
        return False
    return True


class CodeReward:
    """TRL-signature reward over the sandbox."""

    def __init__(self, limits: SandboxLimits | None = None, sandbox: Sandbox | None = None,
                 ignore_think: bool = True, max_parallel: int | None = None, allow_weak_isolation: bool = False):
        self.__name__ = "code"
        self.limits = (limits or SandboxLimits(wall_s=10.0, cpu_s=10)).validate()
        self._sandbox = sandbox
        self.ignore_think = ignore_think
        self.max_parallel = max_parallel
        self.allow_weak_isolation = allow_weak_isolation

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            self._sandbox = default_sandbox()
        if self._sandbox.isolation != "full" and not self.allow_weak_isolation:
            raise SandboxUnavailable(
                f"the code sandbox has only weak isolation here ({self._sandbox.weak_reason}): a policy could "
                "reach the host or forge its verdict. Run as root with CAP_SYS_ADMIN for full isolation, or "
                "accept the risk with the reward option allow_weak_isolation=true.")
        return self._sandbox

    @property
    def isolation(self) -> str:
        """The sandbox's isolation level ("full" or "weak"), recorded beside every score."""
        return self.sandbox.isolation

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
            futures = [pool.submit(self._one, prompts[i], completions[i], {k: v[i] for k, v in cols.items()})
                       for i in range(n)]
            return [f.result() for f in futures]

    # ----------------------------------------------------------------- one sample
    def _one(self, prompt, completion, row: dict) -> CodeResult:
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
        unusable = _unusable(row, kind)
        if unusable:
            return CodeResult(None, reason=f"unusable tests: {unusable}")
        if kind == "stdio":
            return self._stdio(code, row)
        return self._asserts(code, prompt, row, kind)

    def _asserts(self, code: str, prompt, row: dict, kind: str) -> CodeResult:
        helpers = None
        try:
            if kind == "humaneval":
                entry, check = row["entry_point"], "check"
                prefix = row["code_prompt"] if row["code_prompt"] is not None else prompt
                helpers = prefix if _compiles(prefix) else None
                if helpers:  # the task's own code first: a body continues its signature, a whole
                    # program redefines what it wants (the tests keep the task's own helpers either way)
                    code = helpers + ("" if helpers.endswith("\n") else "\n") + code
                source = row["test"]
            else:
                entry, check = None, "__pt_check"
                source = code_harness.mbpp_check_source(row["test_list"], row["test_setup_code"] or "",
                                                        row["test_imports"])
            tests, n = code_harness.instrument(source, check)
            names = code_harness.solution_names(source + "\n" + (helpers or ""))
        except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
            return CodeResult(None, reason=f"unusable tests: {scrub(str(e))}")
        if entry and entry not in names:
            names.append(entry)
        config = {"check": check, "entry_point": entry, "names": names}
        tests_files = {"code_test_runner.py": _PROGRAMS["code_test_runner.py"], "tests.py": tests,
                       "plain_data.py": _PROGRAMS["plain_data.py"], "config.bin": marshal.dumps(config)}
        if helpers:
            tests_files["helpers.py"] = helpers
        roles = [
            Role("solution", {"code_solution_server.py": _PROGRAMS["code_solution_server.py"], "solution.py": code,
                              "plain_data.py": _PROGRAMS["plain_data.py"]},
                 ["code_solution_server.py"], fds={3: "req.r", 4: "resp.w"}, stdin="null"),
            Role("tests", tests_files, ["code_test_runner.py"], fds={3: "report", 4: "req.w", 5: "resp.r"},
                 stdin="null", stdout="null", primary=True),
        ]
        run = self.sandbox.run_roles(roles, channels=["req", "resp"], limits=self.limits)
        n_tests = max(n, 1)
        passed, failures, done, setup = code_harness.parse_report(run.report, n_tests)
        if n == 0 and done:  # tests without asserts: finishing is passing
            passed = [True]
        k = sum(passed)
        problem = run.failure_reason()
        if setup:
            failures.insert(0, setup)
        if problem:
            failures.insert(0, problem)
        elif not done and not setup:
            failures.insert(0, "the tests ended before they finished (no report)")
        failures = [scrub(f) for f in failures[:20]]
        reason = "all tests passed" if k == n_tests and not failures else (failures[0] if failures else "tests failed")
        return CodeResult(k / n_tests, k, n_tests, reason, failures, run.isolation)

    def _stdio(self, code: str, row: dict) -> CodeResult:
        inputs, outputs = row["inputs"], row["outputs"]

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
        return CodeResult(k / len(inputs), k, len(inputs), failures[0] if failures else "all tests passed", failures[:20],
                          self.sandbox.isolation)


def _unusable(row: dict, kind: str) -> str | None:
    """Why a sample's tests cannot be run, in words (dataset problems, not the solution's)."""
    if kind == "humaneval":
        if not isinstance(row["test"], str) or not isinstance(row["entry_point"], str):
            return "'test' and 'entry_point' must be strings"
        if not row["entry_point"].isidentifier():
            return f"entry_point {row['entry_point'][:50]!r} is not a Python name"
        if row["code_prompt"] is not None and not isinstance(row["code_prompt"], str):
            return "'code_prompt' must be a string"
    elif kind == "mbpp":
        if not isinstance(row["test_list"], list) or not all(isinstance(t, str) for t in row["test_list"]):
            return "'test_list' must be a list of strings"
        if row["test_setup_code"] is not None and not isinstance(row["test_setup_code"], str):
            return "'test_setup_code' must be a string"
        if row["test_imports"] is not None and (not isinstance(row["test_imports"], list)
                                                or not all(isinstance(t, str) for t in row["test_imports"])):
            return "'test_imports' must be a list of strings"
    else:
        inputs, outputs = row["inputs"], row["outputs"]
        if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs) or not inputs:
            return "inputs/outputs must be two non-empty lists of equal length"
        if not all(isinstance(x, str) for x in inputs + outputs):
            return "inputs/outputs must hold strings"
    return None
