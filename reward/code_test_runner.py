"""In the sandbox, the tests' process: run the tests against the solution's process.

Runs as `python -I -S code_test_runner.py` in the tests role's working directory, beside
`tests.py` (instrumented by code_harness.instrument), `helpers.py` (the task's own code
prompt, optional), `config.bin` (marshal, from the host) and `plain_data.py`; standard
library only. This process
never runs the solution's code: its builtins, modules and frames are its own. The solution's
functions are proxies that send plain data to the solution's process (fd 4) and read plain
data back (fd 5); the verdict goes to the host on fd 3, which the solution never holds, as
plain_data messages (so text from the solution cannot forge a line):
    ("pass", i) | ("fail", i, reason) | ("setup", reason) | ("done",)
Helpers the task defines (HumanEval/32's `poly`, /38's `encode_cyclic`) come from the code
prompt, not from the solution, so a solution cannot rebind what its tests rely on.
"""

import builtins
import marshal
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plain_data  # noqa: E402

REPORT, REQUESTS, ANSWERS = 3, 4, 5


class SolutionError(Exception):
    """The solution raised something that is not a built-in exception, or could not answer."""


def report(*parts) -> None:
    plain_data.write_message(REPORT, tuple(p if type(p) is int else str(p)[:1000] for p in parts))


def why(e: BaseException) -> str:
    try:
        text = str(e)
    except BaseException:
        text = ""
    return type(e).__name__ + (": " + text if text else "")


class Channel:
    def __init__(self):
        self.answers = os.fdopen(ANSWERS, "rb")

    def ask(self, request: dict) -> dict:
        try:  # NotPlainData here: the tests passed a value the channel does not carry
            plain_data.write_message(REQUESTS, request)
        except BrokenPipeError:
            raise SolutionError("the solution's process ended") from None
        try:
            answer = plain_data.read_message(self.answers)
        except EOFError:
            raise SolutionError("the solution's process ended") from None
        except plain_data.NotPlainData as e:
            raise SolutionError(f"the solution's answer is not plain data: {e}") from None
        if type(answer) is not dict:
            raise SolutionError("the solution's answer is not a message")
        if "setup" in answer:
            raise SolutionError(str(answer["setup"])[:300])
        return answer


def rebuilt(error) -> BaseException:
    """A built-in Exception subclass by name (so `except ValueError` in tests works), else
    SolutionError; never SystemExit or another BaseException-only type, nor the iteration
    protocol's StopIteration."""
    if type(error) is not tuple or len(error) != 2 or not all(type(x) is str for x in error):
        return SolutionError("malformed error from the solution")
    name, message = error[0][:100], error[1][:300]
    cls = getattr(builtins, name, None)
    # StopIteration would end the tests' own loops (map, filter, generators) early: never rebuilt
    if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, (StopIteration, StopAsyncIteration)):
        try:
            return cls(message)
        except Exception:
            pass
    return SolutionError(f"{name}: {message}" if message else name)


def proxy(channel: Channel, name: str):
    def call(*args, **kwargs):
        answer = channel.ask({"op": "call", "name": name, "args": list(args), "kwargs": kwargs})
        if "error" in answer:
            raise rebuilt(answer["error"])
        if "value" not in answer:
            raise SolutionError("the solution's answer holds no value")
        if "args_after" in answer:
            _update_in_place(args, answer["args_after"])
        return answer["value"]

    call.__name__ = call.__qualname__ = name
    return call


def _update_in_place(args: tuple, after) -> None:
    """Mirror what the solution did to mutable arguments (in-place tasks)."""
    if type(after) is not list or len(after) != len(args):
        return
    for mine, theirs in zip(args, after):
        if type(mine) is list and type(theirs) is list:
            mine[:] = theirs
        elif type(mine) in (dict, set) and type(theirs) is type(mine):
            mine.clear()
            mine.update(theirs)


def main() -> None:
    with open("config.bin", "rb") as f:
        config = marshal.load(f)
    with open("tests.py", encoding="utf-8") as f:
        test_source = f.read()
    channel = Channel()
    ns = {"__name__": "tests", "__builtins__": builtins}
    if os.path.exists("helpers.py"):
        with open("helpers.py", encoding="utf-8") as f:
            helpers = f.read()
        try:
            exec(compile(helpers, "helpers.py", "exec"), ns)
        except BaseException as e:
            report("setup", "unusable tests: the task's code prompt raised " + why(e))
            return
    entry = config.get("entry_point")
    wanted = [n for n in config["names"] if n not in ns or n == entry]
    try:
        found = channel.ask({"op": "names", "names": wanted}).get("names")
        if type(found) is not dict:
            raise SolutionError("the solution's answer to the names request is malformed")
        for name in wanted:
            kind = found.get(name)
            if kind == ("callable",):
                ns[name] = proxy(channel, name)
            elif type(kind) is tuple and len(kind) == 2 and kind[0] == "value":
                ns[name] = kind[1]
    except BaseException as e:
        report("setup", why(e) if not isinstance(e, SolutionError) else str(e))
        return
    if entry and found.get(entry) != ("callable",):
        report("setup", f"the solution defines no function {entry!r}")
        return
    ns.update(__pt_pass=lambda i: report("pass", i), __pt_fail=lambda i, e: report("fail", i, why(e)))
    try:
        exec(compile(test_source, "tests.py", "exec"), ns)
        ns[config["check"]](ns[entry] if entry else None)
    except BaseException as e:
        report("setup", "tests stopped: " + why(e))
        return
    report("done")


main()
