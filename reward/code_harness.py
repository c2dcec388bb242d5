"""Host side of assert-style tests (HumanEval `check(candidate)`, MBPP asserts): the test
source as the tests' process runs it, the names it needs from the solution, and its report.

Each top-level statement of the test function that runs an `assert` counts as one test and
is wrapped so that its outcome is reported on its own: a failing assert, an exception or a
`sys.exit()` inside it fails that test only. Asserts inside helpers the tests define, and
asserts of a constant (`assert True, "..."`), are not tests. Statements without asserts run as
written (a crash there fails every test not yet reported).

The tests run in their own process (code_test_runner.py) and reach the solution's process
(code_solution_server.py) only through plain data, so nothing the solution does to its own
interpreter (frames, builtins, modules, "always equal" objects, fake reports, early exit)
can reach the verdict: it can only fail.
"""

from __future__ import annotations

import ast

PASS, FAIL, DONE, SETUP = "pass", "fail", "done", "setup"


def _real_asserts(node: ast.AST):
    """The asserts a statement runs itself: not those of functions, classes or lambdas it
    defines (defining a helper is not a test), nor `assert <constant that is true>` (HumanEval's
    `assert True, "..."` filler cannot fail)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(child, ast.Assert) and not (isinstance(child.test, ast.Constant) and child.test.value):
            yield child
        yield from _real_asserts(child)


class _Instrument:
    """Wrap the statements of one function that run an assert, one reported test each."""

    def __init__(self):
        self.n_tests = 0

    def wrap(self, stmt: ast.stmt) -> ast.stmt:
        wrapper = ast.Module(body=[stmt], type_ignores=[])
        if not any(True for _ in _real_asserts(wrapper)):
            return stmt
        i = self.n_tests
        self.n_tests += 1
        ok = ast.Expr(ast.Call(ast.Name("__pt_pass", ast.Load()), [ast.Constant(i)], []))
        fail = ast.Expr(ast.Call(ast.Name("__pt_fail", ast.Load()), [ast.Constant(i), ast.Name("__pt_e", ast.Load())], []))
        handler = ast.ExceptHandler(type=ast.Name("BaseException", ast.Load()), name="__pt_e", body=[fail])
        return ast.Try(body=[stmt], handlers=[handler], orelse=[ok], finalbody=[])


def instrument(test_source: str, function: str) -> tuple[str, int]:
    """Rewrite `def <function>(...)` in `test_source`; returns (new source, number of tests)."""
    tree = ast.parse(test_source)
    inst = _Instrument()
    found = False
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            node.body = [inst.wrap(s) for s in node.body]
            found = True
    if not found:
        raise ValueError(f"the tests define no function {function!r}")
    return ast.unparse(ast.fix_missing_locations(tree)), inst.n_tests


def mbpp_check_source(test_list: list[str], setup: str = "", imports: list[str] | None = None) -> str:
    """MBPP's assert lines as one test function (they call the solution's function by name)."""
    body = "\n".join(imports or []) + "\n" + (setup or "") + "\n"
    lines = "".join(f"    {t.strip()}\n" for t in test_list)
    return body + "def __pt_check(candidate):\n" + (lines or "    pass\n")


def solution_names(source: str) -> list[str]:
    """Names the tests use but neither bind nor get from builtins: what they may need from
    the solution (MBPP's asserts call the solution's function by name)."""
    import builtins

    tree = ast.parse(source)
    used, bound = set(), set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return sorted(used - bound)


def parse_report(report: bytes, n_tests: int) -> tuple[list[bool], list[str], bool, str | None]:
    """(passed per test, failure reasons, whether the tests finished, a setup error), from the
    tests' plain_data messages. A test passes only if it reported a pass and no failure."""
    from .plain_data import messages

    passed, failed = [False] * n_tests, [False] * n_tests
    reasons: list[str] = []
    done, setup = False, None
    for msg in messages(report):
        if type(msg) is not tuple or not msg or type(msg[0]) is not str:
            continue
        kind = msg[0]
        index = msg[1] if len(msg) > 1 and type(msg[1]) is int and 0 <= msg[1] < n_tests else None
        if kind == PASS and index is not None:
            passed[index] = True
        elif kind == FAIL and index is not None:
            failed[index] = True
            reasons.append(f"test {index}: {msg[2] if len(msg) > 2 and type(msg[2]) is str else 'failed'}")
        elif kind == SETUP and setup is None:
            setup = msg[1] if len(msg) > 1 and type(msg[1]) is str else "setup failed"
        elif kind == DONE:
            done = True
    return [p and not f for p, f in zip(passed, failed)], reasons, done, setup
