"""The `posttrain` command: one sub-command per stage.

    posttrain model info CONFIG            parameter counts and KV-cache size
    posttrain model convert SRC DST --to   FP8 <-> bf16 checkpoint conversion
    posttrain reward score --reward NAME   score a jsonl of completions
    posttrain distill generate|filter|export   R1-style distillation data
    posttrain sft --config FILE [key=value ...]  supervised fine-tuning
    posttrain rm train --config FILE [key=value ...]   Bradley-Terry reward model
    posttrain rm eval --model DIR --data FILE  pairwise accuracy, score histograms
    posttrain rm serve --model DIR [--port N]  a reward model over HTTP
    posttrain grpo --config FILE [key=value ...]   GRPO (rollouts from the torch engine)
    posttrain demo [--out DIR]             the whole pipeline on the embedded default
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_model_info(ns: argparse.Namespace) -> int:
    from posttrain.model.args import ModelArgs
    from posttrain.model.counting import count_parameters, kv_cache_bytes_per_token

    args = ModelArgs.from_json(ns.config)
    c = count_parameters(args)
    kv = kv_cache_bytes_per_token(args, ns.kv_bytes)
    if ns.json:
        print(json.dumps({"params": c.as_dict(), "kv_cache_bytes_per_token": kv}, indent=2))
        return 0

    def b(n: int) -> str:
        return f"{n / 1e9:,.2f}B" if n >= 1e8 else f"{n / 1e6:,.2f}M"

    rows = [
        ("parameters, main model", b(c.total)),
        ("  activated per token", b(c.active) + "  (all dense weights, router, shared + top-k routed "
                                                "experts, LM head; not the embedding lookup)"),
        ("parameters, MTP modules", b(c.mtp) + f"  ({args.num_nextn_predict_layers} depth(s); "
                                               "embedding and head shared)"),
        ("  as stored in a checkpoint", b(c.mtp_checkpoint) + "  (with the embedding/head copies)"),
        ("  activated per token", b(c.active_mtp)),
        ("checkpoint total (main + MTP)", b(c.total_with_mtp)),
        (f"KV cache per token ({ns.kv_bytes}-byte values)",
         f"MLA {kv['mla']:,} B vs plain MHA {kv['mha']:,} B ({kv['mha'] / kv['mla']:.1f}x smaller)"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{ns.config}: {args.num_hidden_layers} layers, hidden {args.hidden_size}, "
          f"{args.n_routed_experts} routed experts (top-{args.num_experts_per_tok}), {args.n_shared_experts} shared")
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")
    return 0


def _cmd_model_convert(ns: argparse.Namespace) -> int:
    import torch
    from posttrain.model.convert import convert_checkpoint

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[ns.dtype]
    counts = convert_checkpoint(ns.src, ns.dst, ns.to, dtype=dtype,
                                progress=lambda f: print(f"  wrote {f}", file=sys.stderr))
    print(f"{ns.src} -> {ns.dst} ({ns.to}): {counts['converted']} tensors converted, {counts['kept']} kept")
    return 0


def _pairs(items: list[str], what: str, parse_json: bool) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"posttrain: error: {what} takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        if parse_json:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # a plain string
        out[key] = value
    return out


def _cmd_reward_score(ns: argparse.Namespace) -> int:
    from posttrain.stages.reward_score import print_summary, score_file

    summary = score_file(ns.reward, Path(ns.data), Path(ns.out), _pairs(ns.map, "--map", False),
                         ns.batch_size, _pairs(ns.option, "--option", True))
    print_summary(summary)
    return 0


def _cmd_distill_generate(ns: argparse.Namespace) -> int:
    from data_recipes.prompt_sets import FieldMap, load_prompts
    from data_recipes.r1_prompts import R1_SYSTEM_PROMPT
    from posttrain.engines import SamplingConfig, make_engine
    from posttrain.stages.distill_generate import generate

    fields = None
    if ns.map:
        fields = FieldMap(**_pairs(ns.map, "--map", False))
    prompts, rejects = load_prompts(ns.prompts, fields, ns.limit, ns.seed)
    system = R1_SYSTEM_PROMPT if ns.system_prompt is None else (
        Path(ns.system_prompt[1:]).read_text() if ns.system_prompt.startswith("@") else ns.system_prompt) or None
    engine = make_engine(ns.engine, ns.model, ns.base_url, ns.api_key_env, ns.concurrency, ns.rps, ns.dtype,
                         ns.max_model_len, ns.latency, ns.tokenizer)
    sampling = SamplingConfig(n=ns.n, max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p,
                              seed=ns.seed)
    summary = generate(prompts, engine, sampling, Path(ns.out), system, ns.chunk_size, rejects)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_distill_filter(ns: argparse.Namespace) -> int:
    from data_recipes.distill_filters import FilterConfig
    from posttrain.stages.distill_filter import run_filter

    cfg = FilterConfig(**_pairs(ns.set, "--set", True))
    cfg.decontaminate = list(ns.decontaminate or cfg.decontaminate)
    summary = run_filter(Path(ns.input), Path(ns.out), cfg)
    print(f"kept {summary['kept']} of {summary['records']} records; rejected {summary['rejected']}:")
    for why, k in summary["reasons"].items():
        print(f"  {k:6d}  {why}")
    print(f"outputs in {ns.out}: kept.jsonl, rejects.jsonl, summary.json")
    return 0


def _cmd_distill_export(ns: argparse.Namespace) -> int:
    from data_recipes.r1_prompts import R1_SYSTEM_PROMPT
    from posttrain.stages.distill_export import export

    system = None if ns.no_system_prompt else R1_SYSTEM_PROMPT
    print(json.dumps(export(Path(ns.input), Path(ns.out), ns.format, ns.kinds, system), indent=2))
    return 0


def _cmd_sft(ns: argparse.Namespace) -> int:
    from posttrain.config import apply_overrides, load_yaml
    from posttrain.stages.sft import run_sft, sft_config

    cfg = sft_config(apply_overrides(load_yaml(ns.config), ns.overrides))
    result = run_sft(cfg)
    print(json.dumps({k: v for k, v in result.items() if k != "data"}, indent=2))
    return 0


def _cmd_rm_train(ns: argparse.Namespace) -> int:
    from posttrain.config import apply_overrides, load_yaml
    from posttrain.stages.rm_train import rm_config, run_rm_train

    cfg = rm_config(apply_overrides(load_yaml(ns.config), ns.overrides))
    print(json.dumps(run_rm_train(cfg), indent=2))
    return 0


def _pair_fields(ns: argparse.Namespace):
    from data_recipes.preference_data import PairFields

    fields = PairFields()
    for item in ns.field or []:
        key, _, column = item.partition("=")
        if key not in PairFields.__dataclass_fields__ or not column:
            from posttrain.model.args import ConfigError

            raise ConfigError(f"--field {item!r}: expected one of {sorted(PairFields.__dataclass_fields__)}=COLUMN")
        setattr(fields, key, None if column == "none" else column)
    return fields


def _cmd_rm_eval(ns: argparse.Namespace) -> int:
    from posttrain.stages.rm_eval import run_rm_eval

    summary = run_rm_eval(ns.model, ns.data, ns.out, _pair_fields(ns), ns.max_length, ns.overlong,
                          ns.batch_size, ns.limit)
    short = {k: v for k, v in summary.items() if k not in ("per_subset",)}
    if len(summary["per_subset"]) > 1:
        short["per_subset"] = {k: round(v["accuracy"], 4) for k, v in summary["per_subset"].items()}
    print(json.dumps(short, indent=2))
    return 0


def _cmd_rm_serve(ns: argparse.Namespace) -> int:
    from reward.model_reward import ModelReward
    from reward.reward_server import make_server

    server = make_server(ModelReward(ns.model, batch_size=ns.batch_size), ns.host, ns.port)
    print(f"serving {ns.model} at http://{ns.host}:{server.server_address[1]}/score", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def _cmd_grpo(ns: argparse.Namespace) -> int:
    from posttrain.config import apply_overrides, load_yaml
    from posttrain.stages.grpo import grpo_config, run_grpo

    print(json.dumps(run_grpo(grpo_config(apply_overrides(load_yaml(ns.config), ns.overrides))), indent=2))
    return 0


def _cmd_demo(ns: argparse.Namespace) -> int:
    from posttrain.stages.demo import run_demo

    run_demo(Path(ns.out), seed=ns.seed)
    return 0


def _config_command(sub, name: str, help: str, example_config: str, example_overrides: str, func) -> None:
    """A stage driven by a YAML config plus key.sub=value overrides."""
    cmd = sub.add_parser(name, help=help)
    cmd.add_argument("--config", required=True, help=f"YAML, e.g. {example_config}")
    cmd.add_argument("overrides", nargs="*", metavar="key.sub=value", help=f"e.g. {example_overrides}")
    cmd.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="inspect and convert DeepSeek-V3 checkpoints")
    msub = model.add_subparsers(dest="model_command", required=True)
    info = msub.add_parser("info", help="parameter counts (total/activated, with and without MTP) and KV-cache bytes")
    info.add_argument("config", help="a config.json, or a checkpoint directory holding one")
    info.add_argument("--kv-bytes", type=int, default=2, help="bytes per cached value (2 = bf16)")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_cmd_model_info)
    conv = msub.add_parser("convert", help="FP8 (e4m3 + weight_scale_inv) <-> bf16, streamed shard by shard")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--to", choices=["bf16", "fp8"], required=True)
    conv.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default="bf16",
                      help="dtype of the non-FP8 tensors written")
    conv.set_defaults(func=_cmd_model_convert)

    rew = sub.add_parser("reward", help="rule-based rewards")
    rsub = rew.add_subparsers(dest="reward_command", required=True)
    score = rsub.add_parser("score", help="score a jsonl of completions (progress bar, summary, rejects file)")
    score.add_argument("--reward", required=True, help="math, code, format, overlong, repetition, language, cosine")
    score.add_argument("--data", required=True, help="jsonl: completion, prompt, and the reward's columns")
    score.add_argument("--out", required=True, help="scored jsonl (plus .summary.json and .rejects.jsonl)")
    score.add_argument("--map", action="append", metavar="OURS=THEIRS",
                       help="read a field under another name, e.g. completion=response, answer=gold")
    score.add_argument("--option", action="append", metavar="KEY=VALUE",
                       help="reward constructor option, e.g. deadline_s=2 or ignore_think=false")
    score.add_argument("--batch-size", type=int, default=64)
    score.set_defaults(func=_cmd_reward_score)

    dis = sub.add_parser("distill", help="R1-style distillation: generate, filter, export")
    dsub = dis.add_subparsers(dest="distill_command", required=True)
    gen = dsub.add_parser("generate", help="N teacher samples per prompt; sharded, resumable")
    gen.add_argument("--prompts", required=True,
                     help="recipe (gsm8k, gsm8k-test, math500, humaneval, synthetic), .jsonl/.parquet, HF dir, hf:NAME")
    gen.add_argument("--map", action="append", metavar="FIELD=SOURCE",
                     help="field mapping for files: problem=question, answer=gold, id=uid, test=..., task=math")
    gen.add_argument("--limit", type=int)
    gen.add_argument("--engine", choices=["torch", "vllm", "openai", "scripted"], default="scripted")
    gen.add_argument("--model", help="checkpoint directory (torch, vllm) or served model name (openai)")
    gen.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000")
    gen.add_argument("--api-key-env", help="environment variable that holds the API key")
    gen.add_argument("--tokenizer", help="openai: the served model's tokenizer (a directory or hub name), for the "
                                         "completions' token ids when the server returns none")
    gen.add_argument("--concurrency", type=int, default=8)
    gen.add_argument("--rps", type=float, help="request rate limit (per second)")
    gen.add_argument("--dtype", default="float32")
    gen.add_argument("--max-model-len", type=int)
    gen.add_argument("--latency", type=float, default=0.0, help=argparse.SUPPRESS)  # scripted teacher: simulated delay
    gen.add_argument("--system-prompt", help="text, @FILE, or '' for none (default: the R1-style prompt)")
    gen.add_argument("--n", type=int, default=4)
    gen.add_argument("--max-tokens", type=int, default=2048)
    gen.add_argument("--temperature", type=float, default=0.6)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--chunk-size", type=int, default=64)
    gen.add_argument("--out", required=True)
    gen.set_defaults(func=_cmd_distill_generate)
    fil = dsub.add_parser("filter", help="verify, check completeness/readability, dedup, decontaminate")
    fil.add_argument("--input", required=True, help="a `distill generate` directory or a jsonl file")
    fil.add_argument("--out", required=True)
    fil.add_argument("--decontaminate", action="append", metavar="BENCHMARK",
                     help="recipe name (math500, gsm8k-test, humaneval) or jsonl file; repeatable")
    fil.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="filter setting, e.g. keep_per_prompt=1, min_reflections=1, max_pass_rate=0.9")
    fil.set_defaults(func=_cmd_distill_filter)
    exp = dsub.add_parser("export", help="SFT-ready chat data with provenance")
    exp.add_argument("--input", required=True, help="a `distill filter` directory or its kept.jsonl")
    exp.add_argument("--out", required=True)
    exp.add_argument("--format", choices=["jsonl", "parquet", "hf"], default="jsonl")
    exp.add_argument("--kinds", choices=["r1", "both"], default="r1")
    exp.add_argument("--no-system-prompt", action="store_true")
    exp.set_defaults(func=_cmd_distill_export)

    _config_command(sub, "sft", "supervised fine-tuning (full or LoRA) on a packed chat mixture",
                    "configs/sft/tiny.yaml", "train.lr=1e-5 lora.enabled=true", _cmd_sft)

    rm = sub.add_parser("rm", help="model-based reward: train, evaluate, serve")
    rmsub = rm.add_subparsers(dest="rm_command", required=True)
    _config_command(rmsub, "train", "Bradley-Terry reward model from an SFT checkpoint or a config",
                    "configs/rm/tiny.yaml", "train.lr=1e-5 lora.enabled=true", _cmd_rm_train)
    rme = rmsub.add_parser("eval", help="pairwise accuracy (per subset, RewardBench sections), score histograms")
    rme.add_argument("--model", required=True, help="reward-model checkpoint directory")
    rme.add_argument("--data", required=True, help="pairs: jsonl(.gz), parquet, HF dataset dir or hf:NAME")
    rme.add_argument("--out", help="report directory (default MODEL/eval/<data name>)")
    rme.add_argument("--field", action="append", metavar="KEY=COLUMN",
                     help="column names: prompt, chosen, rejected, margin, subset, id (none = absent)")
    rme.add_argument("--max-length", type=int, help="default: the length the model was trained with")
    rme.add_argument("--overlong", choices=["drop", "truncate"], default="drop")
    rme.add_argument("--batch-size", type=int, default=16)
    rme.add_argument("--limit", type=int, help="score only the first N pairs")
    rme.set_defaults(func=_cmd_rm_eval)
    rms = rmsub.add_parser("serve", help="POST /score {prompts, completions} -> {rewards}")
    rms.add_argument("--model", required=True)
    rms.add_argument("--host", default="127.0.0.1")
    rms.add_argument("--port", type=int, default=8010)
    rms.add_argument("--batch-size", type=int, default=16)
    rms.set_defaults(func=_cmd_rm_serve)

    _config_command(sub, "grpo", "GRPO from an SFT checkpoint with rule / model rewards",
                    "configs/grpo/tiny.yaml", "grpo.group_size=16", _cmd_grpo)

    demo = sub.add_parser("demo", help="run the pipeline on the embedded default (tiny model, local tokenizer)")
    demo.add_argument("--out", default="demo_out", help="output directory (summary.json, checkpoints, reports)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    from posttrain.model.args import ConfigError
    from posttrain.model.checkpoint import CheckpointError
    from posttrain.stages.distill_generate import ManifestMismatch

    try:
        return ns.func(ns)
    except (ConfigError, CheckpointError, FileNotFoundError, KeyError, ManifestMismatch) as e:
        print(f"posttrain: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
