"""The GRPO stage's time on idle cores and beside CPU-bound low-priority processes.

    python benchmarks/bench_grpo_stage.py --checkpoint DEMO_OUT/sft/final [--iterations 4]
        [--busy 2] [--baseline REF] [--engine torch]

Runs `posttrain grpo` with configs/grpo/tiny.yaml (the demo's GRPO settings) from the demo's
SFT checkpoint for a few iterations, first on idle cores, then beside `--busy` processes that
spin under `nice -n 15` (an interpreter loop, or torch matmuls on every core: --hog), in
this session or each in its own (--apart: where the kernel groups sessions, nice counts only
within one, so each session gets an equal share of the cores); each run in its own interpreter and output directory. Prints the wall
time per iteration and its parts (rollout, old log-probs, optimizer step) from metrics.jsonl,
and the busy / idle ratio. With --baseline, the same for another commit (git worktree).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what runs beside: a spinning interpreter, or a torch process whose matmuls use every core
HOGS = {"python": "import os\nos.nice(15)\nwhile True:\n    pass\n",
        "torch": "import os\nos.nice(15)\nimport torch\na = torch.randn(384, 384)\nwhile True:\n    a @ a\n"}


def _stage(tree: Path, ckpt: str, out: Path, iterations: int, engine: str, busy: int, hog: str, apart: bool) -> dict:
    # apart: each busy process in its own session. With autogroup scheduling (the Linux default on
    # desktops and many servers) sessions share the cores equally and nice counts only inside one
    hogs = [subprocess.Popen([sys.executable, "-c", HOGS[hog]], start_new_session=apart) for _ in range(busy)]
    try:
        t = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "posttrain", "grpo", "--config", "configs/grpo/tiny.yaml",
                              f"model.path={ckpt}", f"output_dir={out}", f"iterations={iterations}",
                              f"engine={engine}", "train.save_every=0", "train.progress=false"],
                             cwd=tree, capture_output=True, text=True)
        wall = time.perf_counter() - t
    finally:
        for h in hogs:
            h.kill()
    if run.returncode:
        raise RuntimeError(f"grpo in {tree} failed:\n{run.stderr[-3000:]}")
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    parts = {k: statistics.mean(r.get(k, 0.0) for r in rows) for k in ("rollout_s", "logprob_s", "train_s")}
    per_iter = statistics.mean(r.get("rollout_s", 0) + r.get("weight_sync_s", 0) + r.get("logprob_s", 0)
                               + r.get("train_s", 0) for r in rows)
    return {"wall_s": wall, "per_iteration_s": per_iter, **parts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--busy", type=int, default=2)
    p.add_argument("--engine", default="torch")
    p.add_argument("--hog", choices=("python", "torch"), default="torch", help="what the busy processes run")
    p.add_argument("--apart", action="store_true", help="each busy process in its own session (autogroup)")
    p.add_argument("--baseline", default=None)
    a = p.parse_args()
    trees = [("this tree", ROOT)]
    tmp = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    if a.baseline:
        subprocess.run(["git", "worktree", "add", "--detach", str(tmp / "tree"), a.baseline], cwd=ROOT, check=True,
                       capture_output=True)
        trees.insert(0, (a.baseline, tmp / "tree"))
    print("| tree | cores | wall s | s per iteration | rollout s | old log-probs s | optimizer step s | vs idle |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    try:
        for label, tree in trees:
            idle = None
            for busy in (0, a.busy):
                r = _stage(tree, a.checkpoint, tmp / f"{label.replace(' ', '_')}-{busy}", a.iterations, a.engine, busy, a.hog, a.apart)
                idle = idle or r["per_iteration_s"]
                cores = "idle" if busy == 0 else (f"beside {busy} nice -n 15 ({a.hog}"
                                                  + (", own sessions)" if a.apart else ", same session)"))
                print(f"| {label} | {cores} | {r['wall_s']:.0f} | {r['per_iteration_s']:.1f} | {r['rollout_s']:.1f} | "
                      f"{r.get('logprob_s', 0):.1f} | {r['train_s']:.1f} | {r['per_iteration_s'] / idle:.2f} |", flush=True)
    finally:
        if a.baseline:
            subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "tree")], cwd=ROOT, capture_output=True)


if __name__ == "__main__":
    main()
