"""In the sandbox, the solution's process: run the solution, then answer the tests' calls.

Runs as `python -I -S code_solution_server.py` in the solution role's working directory,
beside `solution.py` and `plain_data.py`; standard library only. It reads one request
message at a time on fd 3 and answers one message on fd 4 (plain_data messages):
    {"op": "names", "names": [...]} -> {"names": {name: ("callable",) | ("value", v) |
                                                  ("missing",) | ("other", type name)}}
    {"op": "call", "name", "args", "kwargs"} -> {"value": v, "args_after": [...]?} |
                                                {"error": (exception type, message)}
    a solution that failed to load answers every request with {"setup": reason}.
Nothing here is trusted: the solution shares this process and may rewrite any of it. The
tests' process believes only what decodes as plain data (reward/plain_data.py).
"""

import builtins
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plain_data  # noqa: E402

REQUESTS, ANSWERS = 3, 4
MUTABLE = (list, dict, set)


def _why(e: BaseException) -> tuple:
    try:
        text = str(e)
    except BaseException:
        text = ""
    return (type(e).__name__, text[:300])


def _names(ns: dict, names: list) -> dict:
    out = {}
    for name in names:
        if name not in ns:
            out[name] = ("missing",)
        elif callable(ns[name]):
            out[name] = ("callable",)
        else:
            try:
                plain_data.encode(ns[name])
                out[name] = ("value", ns[name])
            except plain_data.NotPlainData:
                out[name] = ("other", type(ns[name]).__name__)
    return out


def _call(ns: dict, req: dict) -> dict:
    fn = ns.get(req["name"])
    if not callable(fn):
        return {"error": ("NameError", f"the solution defines no function {req['name']!r}")}
    args, kwargs = req["args"], req["kwargs"]
    try:
        value = fn(*args, **kwargs)
    except BaseException as e:  # SystemExit included: it ends this call, not the process
        return {"error": _why(e)}
    answer = {"value": value}
    if any(type(a) in MUTABLE for a in args):  # what the call did to its arguments, for in-place tasks
        answer["args_after"] = list(args)
    return answer


def main() -> None:
    requests = os.fdopen(REQUESTS, "rb")
    read, write, NotPlain = plain_data.read_message, plain_data.write_message, plain_data.NotPlainData
    with open("solution.py", encoding="utf-8") as f:
        source = f.read()
    ns = {"__name__": "solution", "__builtins__": builtins}
    setup = None
    try:
        exec(compile(source, "solution.py", "exec"), ns)
    except BaseException as e:
        setup = "solution raised " + ": ".join(x for x in _why(e) if x)
    while True:
        try:
            req = read(requests)
        except EOFError:
            return
        if setup is not None:
            answer = {"setup": setup}
        elif req.get("op") == "names":
            answer = {"names": _names(ns, req["names"])}
        else:
            answer = _call(ns, req)
        try:
            write(ANSWERS, answer)
        except NotPlain as e:
            write(ANSWERS, {"error": ("NotPlainData", str(e))})


main()
