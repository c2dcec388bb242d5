"""Throughput of the rule-based rewards on this machine (run on demand, not in CI).

    python benchmarks/bench_rewards.py [--data ../shared/data]

math: MATH-500 reference solutions against shifted gold answers, so every pair reaches
math-verify (no string-equality shortcut); the anchor is math-verify called directly in
this process, one pair after another, with its own signal-based timeouts.
code: HumanEval canonical solutions, one sandboxed run each; the anchor is the same program
run as a plain `python` subprocess with no isolation.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bench_math(data: Path, n: int) -> dict:
    import reward
    from reward.math_answer import extract_answer

    rows = [json.loads(l) for l in open(data / "math500_test.jsonl")][:n]
    completions = [r["solution"] for r in rows]
    golds = [rows[(i + 1) % len(rows)]["answer"] for i in range(len(rows))]
    r = reward.get("math", deadline_s=5.0)
    _ = r.pool
    t = time.perf_counter()
    r(None, completions, answer=golds)
    pooled = len(rows) / (time.perf_counter() - t)

    from math_verify import parse, verify

    t = time.perf_counter()
    for c, g in zip(completions, golds):
        a, _ = extract_answer(c)
        verify(parse("\\boxed{" + g + "}"), parse("\\boxed{" + (a or "") + "}"))
    direct = len(rows) / (time.perf_counter() - t)
    return {"pairs": len(rows), "workers": r.pool.n_workers, "per_s": pooled, "anchor_per_s": direct}


def bench_code(data: Path, n: int) -> dict:
    import reward
    from reward import code_harness

    rows = [json.loads(l) for l in gzip.open(data / "humaneval.jsonl.gz", "rt")][:n]
    r = reward.get("code")
    _ = r.sandbox
    t = time.perf_counter()
    scores = r([x["prompt"] for x in rows], [x["canonical_solution"] for x in rows],
               test=[x["test"] for x in rows], entry_point=[x["entry_point"] for x in rows])
    sandboxed = len(rows) / (time.perf_counter() - t)
    assert all(s == 1.0 for s in scores)

    from concurrent.futures import ThreadPoolExecutor

    def plain(row):
        with tempfile.TemporaryDirectory() as d:
            src = row["prompt"] + row["canonical_solution"] + "\n" + row["test"] + f"\ncheck({row['entry_point']})\n"
            Path(d, "p.py").write_text(src)
            subprocess.run([sys.executable, "p.py"], cwd=d, check=True, capture_output=True, timeout=30)

    t = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(plain, rows))
    anchor = len(rows) / (time.perf_counter() - t)
    return {"programs": len(rows), "isolation": r.sandbox.isolation, "parallel": r.sandbox.max_parallel,
            "per_s": sandboxed, "anchor_per_s": anchor}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--n", type=int, default=500)
    a = p.parse_args()
    data = Path(a.data)
    m = bench_math(data, a.n)
    c = bench_code(data, a.n)
    print(f"machine: {os.cpu_count()} cores")
    print("| what | n | rewards/s | anchor/s | ratio |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| math-verify via DeadlinePool ({m['workers']} workers) vs direct in-process | {m['pairs']} | "
          f"{m['per_s']:.1f} | {m['anchor_per_s']:.1f} | {m['per_s'] / m['anchor_per_s']:.2f}x |")
    print(f"| HumanEval in sandbox ({c['isolation']}, {c['parallel']} parallel) vs plain subprocess | {c['programs']} | "
          f"{c['per_s']:.1f} | {c['anchor_per_s']:.1f} | {c['per_s'] / c['anchor_per_s']:.2f}x |")


if __name__ == "__main__":
    main()
