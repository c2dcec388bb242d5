"""Rollout throughput (vLLM vs the fallback torch engine) and weight-sync time (buckets vs one
tensor at a time), on the same model and prompts.

    python benchmarks/bench_rollout.py [--checkpoint DIR] [--prompts 64] [--n 4] [--max-tokens 128]
                                       [--sync-scale 4] [--skip-server]

Rollouts: the embedded task's questions, chat-rendered, greedy and sampled (T=1), through
TorchEngine (the core's KV-cache sampler, batch 64) and a colocated VLLMEngine. Greedy outputs
must be identical (checked); tokens/s is over the generated tokens, ratio against torch.

Weight sync: a model like configs/model/tiny.json with `--sync-scale` times the layers and
experts (random weights, so the size is set by the config), pushed into a colocated engine
(in-process handoff) and a vLLM server (HTTP + shared-memory files) with several bucket
sizes; median of 3 pushes, ratio against one tensor at a time. After the last push the
engine's log-probs of a fixed batch must match the trainer's (checked).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tables import print_tables  # benchmarks/ is the script's directory, so on sys.path


def _tiny_args(scale: int):
    from posttrain.model import ModelArgs
    from posttrain.paths import model_config

    cfg = json.loads(model_config("tiny").read_text())
    cfg.update(num_hidden_layers=cfg["num_hidden_layers"] * scale, n_routed_experts=cfg["n_routed_experts"] * scale,
               hidden_size=cfg["hidden_size"] * 2, intermediate_size=cfg["intermediate_size"] * 2,
               moe_intermediate_size=cfg["moe_intermediate_size"] * 2)
    return ModelArgs.from_hf_config(cfg)


def _save_random(args, path: Path, seed: int = 0) -> Path:
    from posttrain.embedded import build_tokenizer
    from posttrain.model import Transformer, save_checkpoint

    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    save_checkpoint(model, args, path, dtype=torch.float32, tokenizer=build_tokenizer(args.vocab_size))
    return path


def bench_rollouts(ckpt: Path, n_prompts: int, n: int, max_tokens: int) -> list[dict]:
    from data_recipes.prompt_sets import synthetic_prompts
    from data_recipes.r1_prompts import build_messages
    from posttrain.engines import SamplingConfig
    from posttrain.engines.torch_engine import TorchEngine
    from posttrain.engines.vllm_engine import VLLMEngine

    prompts = [build_messages(r, None) for r in synthetic_prompts(n_prompts, seed=5)]
    torch_engine = TorchEngine.from_checkpoint(ckpt, batch_size=64)
    t = time.perf_counter()
    vllm_engine = VLLMEngine(ckpt, dtype="float32", max_model_len=1024, enforce_eager=True, colocated=True,
                             kv_cache_gb=1.0)
    start_s = time.perf_counter() - t
    rows = []
    for label, cfg in (("greedy", SamplingConfig(n=1, max_tokens=max_tokens, temperature=0)),
                       (f"sampled T=1, n={n}", SamplingConfig(n=n, max_tokens=max_tokens, temperature=1.0, seed=3))):
        result = {}
        for name, engine in (("torch", torch_engine), ("vllm", vllm_engine)):
            engine.generate(prompts[:2], SamplingConfig(n=1, max_tokens=8, temperature=0))  # warm-up
            t = time.perf_counter()
            out = engine.generate(prompts, cfg)
            secs = time.perf_counter() - t
            tokens = sum(len(s.token_ids) for samples in out for s in samples)
            result[name] = (tokens, secs, out)
        if cfg.temperature == 0:
            same = sum(a[0].token_ids == b[0].token_ids for a, b in zip(result["torch"][2], result["vllm"][2]))
            assert same >= 0.95 * len(prompts), f"greedy outputs differ on {len(prompts) - same} prompts"
        anchor = result["torch"][0] / result["torch"][1]
        for name in ("torch", "vllm"):
            tokens, secs, _ = result[name]
            rows.append({"what": f"rollout {label}", "engine": name, "tokens": tokens, "seconds": round(secs, 2),
                         "tokens_per_s": round(tokens / secs, 1), "ratio_vs_torch": round(tokens / secs / anchor, 2)})
    rows.append({"what": "vLLM engine start", "engine": "vllm", "seconds": round(start_s, 1)})
    vllm_engine.close()
    return rows


def _gap(engine, model, vocab: int) -> float:
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(3, vocab, (k,), generator=g).tolist() for k in (12, 31)]
    got = engine.score(seqs)
    worst = 0.0
    with torch.no_grad():
        for s, lp in zip(seqs, got):
            ids = torch.tensor([s])
            ref = torch.log_softmax(model.forward(ids)[0, :-1].float(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            worst = max(worst, float((torch.tensor(lp) - ref).abs().max()))
    return worst


def bench_sync(scale: int, workdir: Path, server: bool) -> list[dict]:
    from posttrain.embedded import build_tokenizer
    from posttrain.engines.vllm_engine import VLLMEngine
    from posttrain.model import load_checkpoint

    args = _tiny_args(scale)
    ckpt = _save_random(args, workdir / f"sync-x{scale}")
    model, _ = load_checkpoint(ckpt, dtype=torch.float32)
    model.eval()
    size_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    engines = [("in-process", VLLMEngine(ckpt, dtype="float32", max_model_len=256, enforce_eager=True,
                                         colocated=True, kv_cache_gb=0.25))]
    if server:
        from posttrain.engines.vllm_server import VLLMServerEngine

        engines.append(("server, shared memory", VLLMServerEngine(ckpt, build_tokenizer(args.vocab_size), dtype="float32",
                                                                  max_model_len=256, kv_cache_gb=0.25,
                                                                  log_path=workdir / "server.log")))
    rows = []
    for label, engine in engines:
        times = {}
        for bucket_mb in (0, 1, 16, 256):
            runs = []
            for _ in range(3):
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(torch.randn_like(p) * 1e-3)
                stats = engine.load_weights(model, args, bucket_bytes=int(bucket_mb * 2**20))
                runs.append(stats["seconds"])
            times[bucket_mb] = (statistics.median(runs), stats["buckets"])
        gap = _gap(engine, model, args.vocab_size)
        assert gap <= 1e-3, f"{label}: engine and trainer disagree after sync ({gap:.2e})"
        anchor = times[0][0]
        for bucket_mb, (secs, n_buckets) in times.items():
            rows.append({"what": f"weight sync {label}, {size_mb:.0f} MB fp32",
                         "bucket": "one tensor at a time" if bucket_mb == 0 else f"{bucket_mb} MB",
                         "buckets": n_buckets, "seconds": round(secs, 3), "ratio_vs_one_at_a_time": round(anchor / secs, 2),
                         "logp_gap_after": f"{gap:.1e}"})
        engine.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="model for the rollouts (default: the tiny config, random weights)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--sync-scale", type=int, default=4)
    ap.add_argument("--skip-server", action="store_true")
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from posttrain.model import ModelArgs
        from posttrain.paths import model_config

        ckpt = Path(ns.checkpoint) if ns.checkpoint else _save_random(ModelArgs.from_json(model_config("tiny")),
                                                                     work / "tiny")
        rows = bench_rollouts(ckpt, ns.prompts, ns.n, ns.max_tokens) + bench_sync(ns.sync_scale, work, not ns.skip_server)
    print_tables([{"section": "rollouts and weight sync", **r} for r in rows], ("rollouts and weight sync",))


if __name__ == "__main__":
    main()
