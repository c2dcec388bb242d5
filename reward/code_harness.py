"""The in-sandbox test harness for assert-style tests (HumanEval `check(candidate)`, MBPP asserts).

Each top-level statement of the test function that contains an `assert` counts as one test
and is wrapped so that its outcome is reported on its own: a failing assert, an exception or
a `sys.exit()` inside it fails that test only. Statements without asserts run as written (a
crash there fails every test not yet reported).

The harness defends against a solution that tries to pass without being right:
  * results go to a private pipe (fd 3), one line per test, each starting with a nonce the
    harness read from stdin before the solution ran; stdout is never trusted, so printing a
    fake success line does nothing, and a program that exits early reports nothing;
  * builtins are restored from a snapshot taken before the solution ran, and the tests run
    in a copy of the solution's namespace whose builtins are that clean snapshot
    (monkeypatching `builtins` has no effect on them);
  * `==` / `!=` in an assert refuse operands whose type defines `__eq__`/`__ne__` in Python
    (an "always equal" object), checked recursively inside lists, tuples, sets and dicts.
Code that digs the nonce out of the harness's memory could still forge a report; the
sandbox around the harness is what keeps the host safe in any case.
"""

from __future__ import annotations

import ast

PASS, FAIL, DONE, SETUP = "pass", "fail", "done", "setup"


class _Instrument(ast.NodeTransformer):
    """Wrap assert-bearing statements of one function; route ==/!= in asserts to safe checks."""

    def __init__(self):
        self.n_tests = 0

    def visit_Assert(self, node: ast.Assert) -> ast.Assert:
        node.test = _SafeCompare().visit(node.test)
        return node

    def wrap(self, stmt: ast.stmt) -> ast.stmt:
        if not any(isinstance(n, ast.Assert) for n in ast.walk(stmt)):
            return stmt
        i = self.n_tests
        self.n_tests += 1
        stmt = self.visit(stmt)
        ok = ast.Expr(ast.Call(ast.Name("__pt_pass", ast.Load()), [ast.Constant(i)], []))
        fail = ast.Expr(ast.Call(ast.Name("__pt_fail", ast.Load()), [ast.Constant(i), ast.Name("__pt_e", ast.Load())], []))
        handler = ast.ExceptHandler(type=ast.Name("BaseException", ast.Load()), name="__pt_e", body=[fail])
        return ast.Try(body=[stmt], handlers=[handler], orelse=[ok], finalbody=[])


class _SafeCompare(ast.NodeTransformer):
    def visit_Compare(self, node: ast.Compare):
        self.generic_visit(node)
        if len(node.ops) == 1 and isinstance(node.ops[0], (ast.Eq, ast.NotEq)):
            fn = "__pt_eq" if isinstance(node.ops[0], ast.Eq) else "__pt_ne"
            return ast.Call(ast.Name(fn, ast.Load()), [node.left, node.comparators[0]], [])
        return node


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


HARNESS = r'''
def _harness(config):
    # Everything lives in this closure: the solution's `import __main__` finds nothing here.
    import os, sys, builtins, types
    write, report, BaseExc, typ, isinst = os.write, 3, BaseException, type, isinstance
    nonce = sys.stdin.readline().strip()
    sys.stdin = open(os.devnull)
    clean = dict(builtins.__dict__)

    def send(*parts):
        try:
            write(report, (" ".join([nonce] + [str(p) for p in parts]) + "\n").encode())
        except BaseExc:
            pass

    def why(e):
        try:
            text = str(e)
        except BaseExc:
            text = ""
        return (typ(e).__name__ + (": " + text if text else "")).replace("\n", " ")[:300]

    def python_defined(t, name):
        for klass in t.__mro__:
            if name in klass.__dict__:
                return isinst(klass.__dict__[name], types.FunctionType)
        return False

    def plain(v, depth, budget):
        t = typ(v)
        if python_defined(t, "__eq__") or python_defined(t, "__ne__"):
            return False
        budget[0] -= 1
        if depth > 6 or budget[0] < 0:  # very deep or huge values: checked as far as the budget went
            return True
        if t in (list, tuple, set, frozenset):
            return all(plain(x, depth + 1, budget) for x in v)
        if t is dict:
            return all(plain(k, depth + 1, budget) and plain(x, depth + 1, budget) for k, x in v.items())
        return True

    def refuse_custom(a, b):
        if not (plain(a, 0, [100000]) and plain(b, 0, [100000])):
            raise AssertionError("refused: an operand defines __eq__/__ne__ in Python")

    def safe_eq(a, b):
        refuse_custom(a, b)
        return a == b

    def safe_ne(a, b):
        refuse_custom(a, b)
        return a != b

    with open("solution.py", encoding="utf-8") as f:
        source = f.read()
    with open("tests.py", encoding="utf-8") as f:  # before the solution can chdir or delete it
        test_source = f.read()
    ns = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(compile(source, "solution.py", "exec"), ns)
    except BaseExc as e:
        send("setup", "solution raised " + why(e))
        return
    builtins.__dict__.clear()
    builtins.__dict__.update(clean)
    # like the reference harnesses, tests see the solution's names (HumanEval/32 calls `poly`)
    tests = {k: v for k, v in ns.items() if k != "__builtins__"}
    tests.update(__name__="tests", __builtins__=dict(clean), __pt_eq=safe_eq, __pt_ne=safe_ne,
                 __pt_pass=lambda i: send("pass", i), __pt_fail=lambda i, e: send("fail", i, why(e)))
    try:
        exec(compile(test_source, "tests.py", "exec"), tests)
        candidate = ns.get(config["entry_point"]) if config["entry_point"] else None
        if config["entry_point"] and candidate is None:
            send("setup", "solution defines no " + repr(config["entry_point"]))
            return
        tests[config["check"]](candidate)
    except BaseExc as e:
        send("setup", "tests stopped: " + why(e))
        return
    send("done")


_harness(__CONFIG__)
del _harness
'''


def harness_source(check: str, entry_point: str | None) -> str:
    config = {"check": check, "entry_point": entry_point}
    return HARNESS.replace("__CONFIG__", repr(config))


def parse_report(report: str, nonce: str, n_tests: int) -> tuple[list[bool], list[str], bool, str | None]:
    """(passed per test, failure reasons, whether the harness finished, a setup error)."""
    passed = [False] * n_tests
    reasons: list[str] = []
    done, setup = False, None
    for line in report.splitlines():
        parts = line.split(" ", 3)
        if not parts or parts[0] != nonce or len(parts) < 2:
            continue
        kind = parts[1]
        if kind == PASS and len(parts) >= 3 and parts[2].isdigit() and int(parts[2]) < n_tests:
            passed[int(parts[2])] = True
        elif kind == FAIL and len(parts) >= 3 and parts[2].isdigit():
            reasons.append(f"test {parts[2]}: {parts[3] if len(parts) > 3 else 'failed'}")
        elif kind == SETUP:
            setup = " ".join(parts[2:])
        elif kind == DONE:
            done = True
    return passed, reasons, done, setup
