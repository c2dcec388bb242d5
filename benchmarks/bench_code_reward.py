"""Code-reward throughput on the 164 HumanEval canonical solutions: this tree against another
commit's reward package (the baseline), in the same run, on the same machine.

    python benchmarks/bench_code_reward.py [--baseline REF] [--rounds 3] [--data DIR]

The baseline is checked out with `git worktree` into a temporary directory and imported in a
child interpreter, as is this tree, so neither warms the other's caches; rounds alternate
between the two. Prints programs per second for each round and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import gzip, json, sys, time
sys.path.insert(0, sys.argv[1])
import reward
rows = [json.loads(l) for l in gzip.open(sys.argv[2], "rt")]
r = reward.get("code")
sb = r.sandbox
t = time.perf_counter()
scores = r([x["prompt"] for x in rows], [x["canonical_solution"] for x in rows],
           test=[x["test"] for x in rows], entry_point=[x["entry_point"] for x in rows])
dt = time.perf_counter() - t
assert all(s == 1.0 for s in scores), scores
print(json.dumps({"per_s": len(rows) / dt, "n": len(rows), "isolation": sb.isolation,
                  "parallel": sb.max_parallel}))
"""


def _run(tree: Path, data: Path) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", CHILD, str(tree), str(data / "humaneval.jsonl.gz")],
                         capture_output=True, text=True, check=True, cwd=tree)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--baseline", default=None, help="git ref of the reward package to compare with")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    a = p.parse_args()
    data = Path(a.data)
    trees = {"this tree": ROOT}
    tmp = None
    if a.baseline:
        tmp = Path(tempfile.mkdtemp(prefix="bench-baseline-"))
        subprocess.run(["git", "worktree", "add", "--detach", str(tmp / "tree"), a.baseline], cwd=ROOT, check=True,
                       capture_output=True)
        trees = {f"baseline {a.baseline}": tmp / "tree", **trees}
    try:
        results: dict[str, list[float]] = {k: [] for k in trees}
        info = {}
        for _ in range(a.rounds):
            for name, tree in trees.items():
                r = _run(tree, data)
                results[name].append(r["per_s"])
                info[name] = r
        print(f"HumanEval canonical solutions ({info['this tree']['n']} programs), "
              f"{info['this tree']['parallel']} parallel, isolation {info['this tree']['isolation']}")
        print("| tree | programs/s per round | median |")
        print("| --- | --- | --- |")
        for name, values in results.items():
            print(f"| {name} | {', '.join(f'{v:.1f}' for v in values)} | {statistics.median(values):.1f} |")
        if a.baseline:
            base = statistics.median(results[f"baseline {a.baseline}"])
            mine = statistics.median(results["this tree"])
            print(f"cost per program, this tree vs baseline: {base / mine:.2f}x")
    finally:
        if tmp is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "tree")], cwd=ROOT, capture_output=True)


if __name__ == "__main__":
    main()
