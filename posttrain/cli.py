"""The `posttrain` command: one sub-command per stage, all driven the same way.

    posttrain model info CONFIG            parameter counts and KV-cache size
    posttrain model convert SRC DST --to   FP8 <-> bf16 checkpoint conversion
    posttrain reward score --reward NAME   score a jsonl of completions
    posttrain distill generate|filter|export   R1-style distillation data
    posttrain sft --config FILE [key=value ...]  supervised fine-tuning
    posttrain rm train --config FILE [key=value ...]   Bradley-Terry reward model
    posttrain rm eval --model DIR --data FILE  pairwise accuracy, score histograms
    posttrain rm serve --model DIR [--port N]  a reward model over HTTP
    posttrain grpo --config FILE [key=value ...]   GRPO
    posttrain demo [--out DIR]             the whole pipeline on the embedded default

Every command reads one typed config (posttrain/config.py): `--config FILE` (YAML), then its
flags, each an alias of a config key (`--lr` is not a thing; `train.lr=1e-5` is), then
`key.sub=value` overrides. The resolved config is written beside the output. A command that
writes refuses an output it did not write (`--overwrite` writes into it anyway, removing
nothing), an output that is one of its inputs, and a rerun with other settings (`--restart`
starts over). Expected failures print one line naming the file or key and exit 2; `--debug`
shows the traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Alias:
    """A flag that sets a config key. kind: value (the flag's text), const (a fixed value),
    append (a list of texts), pairs (KEY=VALUE into `key.KEY`), positional (an argument)."""

    flags: tuple[str, ...]
    key: str
    kind: str = "value"
    const: Any = None
    help: str = ""
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return "alias_" + self.key.replace(".", "_")


@dataclass
class Command:
    path: tuple[str, ...]
    help: str
    config: Callable[[], type]               # the config dataclass (imported late: fast --help)
    run: Callable[[Any, argparse.Namespace], int]
    aliases: list[Alias] = field(default_factory=list)
    writes: bool = True                      # takes --overwrite / --restart


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ------------------------------------------------------------------- runners
def _model_info(cfg, ns) -> int:
    from posttrain.model.args import ModelArgs
    from posttrain.model.counting import count_parameters, kv_cache_bytes_per_token

    args = ModelArgs.from_json(cfg.config)
    c = count_parameters(args)
    kv = kv_cache_bytes_per_token(args, cfg.kv_bytes)
    if cfg.json:
        _print_json({"params": c.as_dict(), "kv_cache_bytes_per_token": kv})
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
        (f"KV cache per token ({cfg.kv_bytes}-byte values)",
         f"MLA {kv['mla']:,} B vs plain MHA {kv['mha']:,} B ({kv['mha'] / kv['mla']:.1f}x smaller)"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{cfg.config}: {args.num_hidden_layers} layers, hidden {args.hidden_size}, "
          f"{args.n_routed_experts} routed experts (top-{args.num_experts_per_tok}), {args.n_shared_experts} shared")
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")
    return 0


def _convert(cfg, ns) -> int:
    from posttrain.stages.convert import run_convert

    counts = run_convert(cfg, ns.overwrite, ns.restart)
    print(f"{cfg.src} -> {cfg.dst} ({cfg.to}): {counts['converted']} tensors converted, {counts['kept']} kept")
    return 0


def _score(cfg, ns) -> int:
    from posttrain.stages.reward_score import print_summary, run_score

    print_summary(run_score(cfg, ns.overwrite, ns.restart))
    return 0


def _generate(cfg, ns) -> int:
    from posttrain.stages.distill_generate import run_generate

    _print_json(run_generate(cfg, ns.overwrite, ns.restart))
    return 0


def _filter(cfg, ns) -> int:
    from posttrain.stages.distill_filter import run_filter_stage

    summary = run_filter_stage(cfg, ns.overwrite, ns.restart)
    print(f"kept {summary['kept']} of {summary['records']} records; rejected {summary['rejected']}:")
    for why, k in summary["reasons"].items():
        print(f"  {k:6d}  {why}")
    print(f"outputs in {cfg.output_dir}: kept.jsonl, rejects.jsonl, summary.json")
    return 0


def _export(cfg, ns) -> int:
    from posttrain.stages.distill_export import run_export

    _print_json(run_export(cfg, ns.overwrite, ns.restart))
    return 0


def _sft(cfg, ns) -> int:
    from posttrain.stages.sft import run_sft

    result = run_sft(cfg, ns.overwrite, ns.restart)
    _print_json({k: v for k, v in result.items() if k != "data"})
    return 0


def _rm_train(cfg, ns) -> int:
    from posttrain.stages.rm_train import run_rm_train

    _print_json(run_rm_train(cfg, ns.overwrite, ns.restart))
    return 0


def _rm_eval(cfg, ns) -> int:
    from posttrain.stages.rm_eval import run_rm_eval_stage

    summary = run_rm_eval_stage(cfg, ns.overwrite, ns.restart)
    short = {k: v for k, v in summary.items() if k not in ("per_subset",)}
    if len(summary["per_subset"]) > 1:
        short["per_subset"] = {k: round(v["accuracy"], 4) for k, v in summary["per_subset"].items()}
    _print_json(short)
    return 0


def _rm_serve(cfg, ns) -> int:
    from reward.model_reward import ModelReward
    from reward.reward_server import make_server

    server = make_server(ModelReward(cfg.model, batch_size=cfg.batch_size), cfg.host, cfg.port)
    print(f"serving {cfg.model} at http://{cfg.host}:{server.server_address[1]}/score", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def _grpo(cfg, ns) -> int:
    from posttrain.stages.grpo import run_grpo

    _print_json(run_grpo(cfg, ns.overwrite, ns.restart))
    return 0


def _demo(cfg, ns) -> int:
    from posttrain.stages.demo import run_demo

    run_demo(Path(cfg.out), seed=cfg.seed, overwrite=ns.overwrite, restart=ns.restart)
    return 0


# ------------------------------------------------------------------ the table
def _configs():
    """Config classes by command, imported when a command runs (so `--help` stays quick)."""
    from posttrain.stages import configs

    return configs


COMMANDS = [
    Command(("model", "info"), "parameter counts (total/activated, with and without MTP) and KV-cache bytes",
            lambda: _configs().ModelInfoConfig, _model_info, [
                Alias(("config",), "config", "positional", help="a config.json, or a checkpoint directory holding one"),
                Alias(("--kv-bytes",), "kv_bytes", help="bytes per cached value (2 = bf16)"),
                Alias(("--json",), "json", "const", True, help="machine-readable output")], writes=False),
    Command(("model", "convert"), "FP8 (e4m3 + weight_scale_inv) <-> bf16, streamed shard by shard",
            lambda: _configs().ConvertConfig, _convert, [
                Alias(("src",), "src", "positional"), Alias(("dst",), "dst", "positional"),
                Alias(("--to",), "to", help="bf16 or fp8"),
                Alias(("--dtype",), "dtype", help="bf16, fp32 or fp16: dtype of the non-FP8 tensors written")]),
    Command(("reward", "score"), "score a jsonl of completions (progress bar, summary, rejects file)",
            lambda: _configs().ScoreConfig, _score, [
                Alias(("--reward",), "reward", help="math, code, format, overlong, repetition, language, cosine, "
                                                    "or module:function"),
                Alias(("--data",), "data", help="jsonl: completion, prompt, and the reward's columns"),
                Alias(("--out",), "output", help="scored jsonl (plus .summary.json and .rejects.jsonl)"),
                Alias(("--map",), "map", "pairs", metavar="OURS=THEIRS",
                      help="read a field under another name, e.g. completion=response, answer=gold"),
                Alias(("--option",), "options", "pairs", metavar="KEY=VALUE",
                      help="reward option, e.g. deadline_s=2, ignore_think=false, allow_weak_isolation=true"),
                Alias(("--batch-size",), "batch_size")]),
    Command(("distill", "generate"), "N teacher samples per prompt; sharded, resumable",
            lambda: _configs().GenerateConfig, _generate, [
                Alias(("--prompts",), "prompts.source",
                      help="recipe (gsm8k, gsm8k-test, math500, humaneval, synthetic), .jsonl/.parquet, HF dir, hf:NAME"),
                Alias(("--map",), "prompts.fields", "pairs", metavar="FIELD=SOURCE",
                      help="field mapping for files: problem=question, answer=gold, id=uid, test=..., task=math"),
                Alias(("--limit",), "prompts.limit"),
                Alias(("--engine",), "engine.kind", help="scripted (default), torch, vllm or openai"),
                Alias(("--model",), "engine.model", help="checkpoint directory (torch, vllm) or served model (openai)"),
                Alias(("--base-url",), "engine.base_url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000"),
                Alias(("--api-key-env",), "engine.api_key_env", help="environment variable that holds the API key"),
                Alias(("--tokenizer",), "engine.tokenizer",
                      help="openai: the served model's tokenizer, for the completions' token ids"),
                Alias(("--concurrency",), "engine.concurrency"), Alias(("--rps",), "engine.rps"),
                Alias(("--dtype",), "engine.dtype"), Alias(("--max-model-len",), "engine.max_model_len"),
                Alias(("--latency",), "engine.latency", help=argparse.SUPPRESS),
                Alias(("--system-prompt",), "system_prompt",
                      help="r1 (default: the R1-style prompt), text, @FILE, or '' for none"),
                Alias(("--n",), "sampling.n"), Alias(("--max-tokens",), "sampling.max_tokens"),
                Alias(("--temperature",), "sampling.temperature"), Alias(("--top-p",), "sampling.top_p"),
                Alias(("--seed",), "sampling.seed"), Alias(("--chunk-size",), "chunk_size"),
                Alias(("--out",), "output_dir")]),
    Command(("distill", "filter"), "verify, check completeness/readability, dedup, decontaminate",
            lambda: _configs().FilterStageConfig, _filter, [
                Alias(("--input",), "input", help="a `distill generate` directory or a jsonl file"),
                Alias(("--out",), "output_dir"),
                Alias(("--decontaminate",), "filter.decontaminate", "append", metavar="BENCHMARK",
                      help="recipe name (math500, gsm8k-test, humaneval) or jsonl file; repeatable"),
                Alias(("--set",), "filter", "pairs", metavar="KEY=VALUE",
                      help="filter setting, e.g. keep_per_prompt=1, min_reflections=1, max_pass_rate=0.9")]),
    Command(("distill", "export"), "SFT-ready chat data with provenance",
            lambda: _configs().ExportConfig, _export, [
                Alias(("--input",), "input", help="a `distill filter` directory or its kept.jsonl"),
                Alias(("--out",), "output"), Alias(("--format",), "format", help="jsonl, parquet or hf"),
                Alias(("--kinds",), "kinds", help="r1 or both"),
                Alias(("--system-prompt",), "system_prompt",
                      help="keep (default: the one the teacher was sampled with), text, @FILE, or '' for none"),
                Alias(("--no-system-prompt",), "system_prompt", "const", None, help="export without a system prompt")]),
    Command(("sft",), "supervised fine-tuning (full or LoRA) on a packed chat mixture",
            lambda: _configs().SFTConfig, _sft),
    Command(("rm", "train"), "Bradley-Terry reward model from an SFT checkpoint or a config",
            lambda: _configs().RMConfig, _rm_train),
    Command(("rm", "eval"), "pairwise accuracy (per subset, RewardBench sections), score histograms",
            lambda: _configs().RMEvalConfig, _rm_eval, [
                Alias(("--model",), "model", help="reward-model checkpoint directory"),
                Alias(("--data",), "data", help="pairs: jsonl(.gz), parquet, HF dataset dir or hf:NAME"),
                Alias(("--out",), "output_dir", help="report directory (default <model>-eval/<data name>)"),
                Alias(("--field",), "fields", "pairs", metavar="KEY=COLUMN",
                      help="column names: prompt, chosen, rejected, margin, subset, id (none = absent)"),
                Alias(("--max-length",), "max_length", help="default: the length the model was trained with"),
                Alias(("--overlong",), "overlong", help="drop or truncate"),
                Alias(("--batch-size",), "batch_size"), Alias(("--limit",), "limit", help="score the first N pairs")]),
    Command(("rm", "serve"), "POST /score {prompts, completions} -> {rewards}",
            lambda: _configs().ServeConfig, _rm_serve, [
                Alias(("--model",), "model"), Alias(("--host",), "host"), Alias(("--port",), "port"),
                Alias(("--batch-size",), "batch_size")], writes=False),
    Command(("grpo",), "GRPO from an SFT checkpoint with rule / model rewards",
            lambda: _configs().GRPOConfig, _grpo),
    Command(("demo",), "run the pipeline on the embedded default (tiny model, local tokenizer)",
            lambda: _configs().DemoConfig, _demo, [
                Alias(("--out",), "out", help="output directory (summary.json, checkpoints, reports)"),
                Alias(("--seed",), "seed")]),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the traceback of an expected failure too")
    sub = p.add_subparsers(dest="command", required=True)
    groups: dict[tuple[str, ...], Any] = {(): sub}
    for cmd in COMMANDS:
        parent = groups[()]
        for depth in range(1, len(cmd.path)):
            key = cmd.path[:depth]
            if key not in groups:
                group = parent.add_parser(key[-1], help={"model": "inspect and convert DeepSeek-V3 checkpoints",
                                                         "reward": "rule-based rewards",
                                                         "distill": "R1-style distillation: generate, filter, export",
                                                         "rm": "model-based reward: train, evaluate, serve"}[key[-1]])
                groups[key] = group.add_subparsers(dest="_".join(key) + "_command", required=True)
            parent = groups[key]
        c = parent.add_parser(cmd.path[-1], help=cmd.help, description=cmd.help)
        for a in cmd.aliases:
            if a.kind == "positional":
                c.add_argument(a.dest, metavar=a.flags[0].upper(), help=a.help)
            elif a.kind == "const":
                c.add_argument(*a.flags, dest=a.dest, action="store_const", const=True, help=a.help)
            elif a.kind in ("append", "pairs"):
                c.add_argument(*a.flags, dest=a.dest, action="append", metavar=a.metavar, help=a.help)
            else:
                c.add_argument(*a.flags, dest=a.dest, metavar=a.metavar or "VALUE", help=a.help or f"config key {a.key}")
        c.add_argument("--config", help="a YAML file of this command's settings (see configs/)")
        c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an expected failure too")
        c.add_argument("overrides", nargs="*", metavar="key.sub=value", help="settings on top of --config and flags")
        if cmd.writes:
            c.add_argument("--overwrite", action="store_true",
                           help="write into an existing output this command did not write (nothing is removed)")
            c.add_argument("--restart", action="store_true",
                           help="start over in an output this command wrote with other settings")
        c.set_defaults(func=cmd)
    return p


def _aliases(cmd: Command, ns: argparse.Namespace, cls) -> dict[str, Any]:
    """Config keys set by the command's flags, typed as their fields are."""
    from posttrain.config import _hint_at, _parse
    from posttrain.model.args import ConfigError

    out: dict[str, Any] = {}
    for a in cmd.aliases:
        value = getattr(ns, a.dest, None)
        if value is None:
            continue
        if a.kind == "const":
            out[a.key] = a.const
        elif a.kind == "append":
            out[a.key] = list(value)
        elif a.kind == "pairs":
            for item in value:
                k, sep, raw = item.partition("=")
                if not sep or not k:
                    raise ConfigError(f"{a.flags[0]} {item!r}: expected KEY=VALUE")
                key = f"{a.key}.{k}"
                hint = _hint_at(cls, key.split("."))
                out[key] = None if raw == "none" and a.key == "fields" else _parse(raw, hint)
        else:
            hint = _hint_at(cls, a.key.split("."))
            out[a.key] = None if value == "" and a.key == "system_prompt" else _parse(value, hint)
    return out


def _run(cmd: Command, ns: argparse.Namespace) -> int:
    from posttrain.config import load_config

    cls = cmd.config()
    cfg = load_config(cls, ns.config, ns.overrides, _aliases(cmd, ns, cls))
    if not cmd.writes:
        ns.overwrite = ns.restart = False
    return cmd.run(cfg, ns)


def _one_line(e: BaseException) -> str:
    """An expected failure as one line: the file or key it names, and the fix."""
    if isinstance(e, OSError) and not type(e).__module__.startswith(("posttrain", "reward", "data_recipes")):
        where = e.filename or ""
        fixes = {errno.ENOSPC: "no space left on the device: free some or choose another output path",
                 errno.EROFS: "a read-only file system: choose a writable output path",
                 errno.EACCES: "permission denied: choose a path this user may use",
                 errno.EPERM: "operation not permitted: choose a path this user may use",
                 errno.ENOENT: "no such file or directory", errno.EISDIR: "a directory where a file is expected",
                 errno.ENOTDIR: "a file where a directory is expected"}
        text = fixes.get(e.errno) or e.strerror or str(e)
        if where:
            return f"{where}: {text}"
    text = " ".join(str(e).split())
    return (text[:500] + "...") if len(text) > 500 else text


def _expected() -> tuple[type, ...]:
    from posttrain.engines.base import EngineError
    from posttrain.errors import DataError
    from posttrain.model.args import ConfigError
    from posttrain.model.checkpoint import CheckpointError
    from posttrain.outputs import OutputError
    from posttrain.stages.distill_generate import ManifestMismatch
    from reward.sandbox import SandboxUnavailable

    return (ConfigError, CheckpointError, OutputError, DataError, ManifestMismatch, SandboxUnavailable, EngineError,
            OSError)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return _run(ns.func, ns)
    except Exception as e:  # noqa: BLE001 - sorted below: expected ones become one line
        if ns.debug or not isinstance(e, _expected()):
            raise
        print(f"posttrain: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
