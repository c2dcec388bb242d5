"""A corpus of bad inputs and careless mistakes against every command, run in-process.

Each case either exits 2 with one line naming the file or key (and no traceback), or ends
well with a rejects row that gives the reason; both are asserted. The inputs are hashed
before and after every case: nothing outside the command's own output may change, and a
user's directory pointed at as an output survives.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from posttrain.cli import main as cli
from posttrain.embedded import build_tokenizer
from posttrain.model import ModelArgs, Transformer, save_checkpoint
from posttrain.paths import model_config

NAN = "nan"


# ------------------------------------------------------------------ workspace
@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Inputs every case reads (never written by a case): data files, checkpoints, configs."""
    root = tmp_path_factory.mktemp("inputs")
    cfg = json.loads(model_config("tiny").read_text())
    cfg.update(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
               n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=32,
               kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)
    args = ModelArgs.from_hf_config(cfg)
    tok = build_tokenizer(args.vocab_size)
    torch.manual_seed(0)
    save_checkpoint(Transformer(args), args, root / "policy", tokenizer=tok)
    save_checkpoint(Transformer(args, scalar_head=True), args, root / "rm", tokenizer=tok)
    shutil.copytree(root / "policy", root / "corrupt")
    (root / "corrupt" / "model.safetensors").write_bytes(os.urandom(4096))
    shutil.copytree(root / "policy", root / "truncated")
    data = (root / "policy" / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(data[: len(data) // 2])
    shutil.copytree(root / "policy", root / "inconsistent")
    bad = json.loads((root / "policy" / "config.json").read_text())
    bad["n_group"] = 3  # 4 routed experts cannot form 3 groups
    (root / "inconsistent" / "config.json").write_text(json.dumps(bad))
    (root / "noconfig").mkdir()
    (root / "notjson.json").write_text("{not json")

    lines = lambda rows: "".join(json.dumps(r) + "\n" for r in rows)  # noqa: E731
    (root / "prompts.jsonl").write_text(lines({"problem": f"What is {i} + {i}?", "answer": str(2 * i)}
                                              for i in range(6)))
    (root / "prompts_gold_unmapped.jsonl").write_text(lines({"question": f"What is {i} + 1?", "solution": str(i + 1)}
                                                            for i in range(4)))
    (root / "completions.jsonl").write_text(lines({"completion": f"<think>ok</think> \\boxed{{{i}}}", "answer": str(i)}
                                                  for i in range(4)))
    chat = lambda i: {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}  # noqa
    (root / "sft.jsonl").write_text(lines(chat(i) for i in range(8)))
    (root / "pairs.jsonl").write_text(lines({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}
                                            for i in range(8)))
    (root / "empty.jsonl").write_text("")
    (root / "binary.jsonl").write_bytes(bytes(range(256)) * 64)
    (root / "huge_line.jsonl").write_text("x" * (4 << 20) + "\n")
    (root / "kept.jsonl").write_text(lines({"id": f"p{i}#0", "prompt_id": f"p{i}", "problem": f"q{i}",
                                            "completion": f"<think>t</think> a{i}", "messages": [
                                                {"role": "system", "content": "be careful"},
                                                {"role": "user", "content": f"q{i}"}]} for i in range(3)))
    (root / "user_dir").mkdir()
    (root / "user_dir" / "thesis.txt").write_text("years of work")
    (root / "user_file.jsonl").write_text("my own notes\n")
    yaml_dump = lambda d: json.dumps(d)  # noqa: E731 - JSON is YAML
    train = {"max_steps": 1, "batch_size": 1, "lr": 1e-3, "min_lr": 1e-4, "progress": False, "report_to": ["jsonl"]}
    (root / "sft.yaml").write_text(yaml_dump({
        "model": {"path": str(root / "policy")}, "data": {"sources": [{"path": str(root / "sft.jsonl")}],
                                                          "max_length": 64, "cache_dir": str(root / ".cache")},
        "train": train}))
    (root / "rm.yaml").write_text(yaml_dump({
        "model": {"path": str(root / "policy")}, "data": {"train": [{"path": str(root / "pairs.jsonl")}],
                                                          "max_length": 64}, "train": train}))
    (root / "grpo.yaml").write_text(yaml_dump({
        "model": {"path": str(root / "policy")}, "prompts": {"source": "synthetic", "limit": 4, "eval_limit": 2},
        "grpo": {"group_size": 2, "prompts_per_step": 2, "max_new_tokens": 4}, "iterations": 1,
        "train": {k: v for k, v in train.items() if k not in ("max_steps", "batch_size")}}))
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "broken.yaml").write_text("model: {path: [unclosed\n")
    return root


@pytest.fixture(scope="module")
def readonly(tmp_path_factory):
    """A directory no one can write in: a read-only tmpfs as root, else one without write bits."""
    path = tmp_path_factory.mktemp("readonly")
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                          capture_output=True).returncode != 0:
            pytest.skip("root here cannot mount a read-only tmpfs, and permission bits do not stop root")
        yield path
        subprocess.run(["umount", str(path)], capture_output=True)
    else:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """A file system with almost no room: a 32 KiB tmpfs (root only)."""
    path = tmp_path_factory.mktemp("full")
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("a full disk is simulated with a tiny tmpfs, which needs root")
    yield path
    subprocess.run(["umount", str(path)], capture_output=True)


def _snapshot(root: Path, skip: Path | None) -> dict[str, str]:
    """Every file under root, hashed, but the command's own output (with the files it keeps
    beside an output file: OUT.config.yaml, OUT.rejects.jsonl, ...)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents or
                                 (p.parent == skip.parent and p.name.startswith(skip.name + "."))):
            continue
        if ".cache" in p.parts:  # the data caches a stage is allowed to fill
            continue
        out[str(p.relative_to(root))] = hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


# ---------------------------------------------------------------------- cases
@dataclass
class Case:
    argv: list[str]
    expect: str                       # "error": exit 2, one line; "rejects": exit 0 and a rejects row
    mentions: str                     # the key or file name the line (or the reject reason) must name
    output: str | None = None         # the command's own output, relative to the case directory
    rejects: str | None = None        # where the rejects row is, relative to the case directory
    extra: list[str] = field(default_factory=list)


def _w(ws: Path, name: str) -> str:
    return str(ws / name)


def cases() -> dict[str, tuple]:
    """name -> (argv template, expect, mentions, output, rejects). {ws} is the inputs
    directory, {out} the case's own output directory."""
    c: dict[str, tuple] = {}
    score = ["reward", "score", "--reward", "math", "--data", "{ws}/completions.jsonl", "--out", "{out}/s.jsonl"]
    for opt, value in [("--batch-size", "0"), ("--batch-size", "-1"), ("--batch-size", NAN)]:
        c[f"score{opt}={value}"] = (score + [opt, value], "error", "batch_size", "s.jsonl", None)
    c["score missing data"] = (["reward", "score", "--reward", "math", "--data", "{ws}/nope.jsonl", "--out",
                                "{out}/s.jsonl"], "error", "nope.jsonl", "s.jsonl", None)
    c["score data is a directory"] = (["reward", "score", "--reward", "math", "--data", "{ws}/user_dir", "--out",
                                       "{out}/s.jsonl"], "error", "user_dir", "s.jsonl", None)
    for name in ("empty", "binary", "huge_line"):
        c[f"score {name} file"] = (["reward", "score", "--reward", "math", "--data", "{ws}/%s.jsonl" % name, "--out",
                                    "{out}/s.jsonl"], "error", f"{name}.jsonl", "s.jsonl", None)
    c["score out is data"] = (["reward", "score", "--reward", "math", "--data", "{ws}/completions.jsonl", "--out",
                               "{ws}/completions.jsonl"], "error", "completions.jsonl", None, None)
    c["score out is a user's file"] = (["reward", "score", "--reward", "math", "--data", "{ws}/completions.jsonl",
                                        "--out", "{ws}/user_file.jsonl"], "error", "user_file.jsonl", None, None)
    c["score out is a directory"] = (score[:-1] + ["{ws}/user_dir"], "error", "user_dir", None, None)
    c["score unknown reward"] = (["reward", "score", "--reward", "nope", "--data", "{ws}/completions.jsonl", "--out",
                                  "{out}/s.jsonl"], "error", "nope", "s.jsonl", None)
    c["score unknown option"] = (score + ["--option", "frobnicate=1"], "error", "frobnicate", "s.jsonl", None)
    c["score map without ="] = (score + ["--map", "completion"], "error", "--map", "s.jsonl", None)
    c["score unknown key"] = (score + ["batchsize=3"], "error", "batchsize", "s.jsonl", None)
    c["score read-only output"] = (score[:-1] + ["{ro}/s.jsonl"], "error", "cannot write here", None, None)

    gen = ["distill", "generate", "--prompts", "{ws}/prompts.jsonl", "--out", "{out}/gen", "--max-tokens", "64"]
    for opt, values, key in [("--n", ("0", "-1", NAN), "sampling.n"), ("--max-tokens", ("0", NAN), "sampling.max_tokens"),
                             ("--temperature", ("-1", NAN), "sampling.temperature"),
                             ("--top-p", ("0", "1.5", NAN), "sampling.top_p"),
                             ("--chunk-size", ("0", "-1"), "chunk_size"), ("--limit", ("0", "-3"), "prompts.limit"),
                             ("--concurrency", ("0",), "engine.concurrency"), ("--rps", ("-1", NAN), "engine.rps")]:
        for v in values:
            c[f"generate{opt}={v}"] = (gen + [opt, v], "error", key, "gen", None)
    c["generate unknown engine"] = (gen + ["--engine", "magic"], "error", "engine.kind", "gen", None)
    c["generate torch without model"] = (gen + ["--engine", "torch"], "error", "engine.model", "gen", None)
    c["generate corrupt model"] = (gen + ["--engine", "torch", "--model", "{ws}/corrupt"], "error",
                                   "model.safetensors", "gen", None)
    c["generate model without config"] = (gen + ["--engine", "torch", "--model", "{ws}/noconfig"], "error",
                                          "noconfig", "gen", None)
    c["generate missing prompts"] = (["distill", "generate", "--prompts", "{ws}/nope.jsonl", "--out", "{out}/gen"],
                                     "error", "nope.jsonl", "gen", None)
    for name in ("empty", "binary"):
        c[f"generate {name} prompts"] = (["distill", "generate", "--prompts", "{ws}/%s.jsonl" % name, "--out",
                                          "{out}/gen"], "error", "prompts", "gen", None)
    c["generate into a user's directory"] = (gen[:-3] + ["{ws}/user_dir"], "error", "user_dir", None, None)
    c["generate out is the prompts"] = (gen[:5] + ["{ws}/prompts.jsonl"], "error", "prompts.jsonl", None, None)
    c["generate system prompt file missing"] = (gen + ["--system-prompt", "@{ws}/nope.txt"], "error", "nope.txt",
                                                "gen", None)
    c["generate bad answer format"] = (gen + ["--map", "answer_format=roman"], "error", "answer_format", "gen", None)
    c["generate bad prompt rows"] = (["distill", "generate", "--prompts", "{ws}/mixed_prompts.jsonl", "--out",
                                      "{out}/gen", "--max-tokens", "64", "--n", "1"], "rejects", "problem", "gen",
                                     "gen/prompt_rejects.jsonl")

    c["generate read-only output"] = (gen[:5] + ["{ro}/gen"], "error", "cannot", None, None)
    c["sft read-only output"] = (["sft", "--config", "{ws}/sft.yaml", "output_dir={ro}/sft"], "error", "cannot", None,
                                 None)
    c["generate into a full disk"] = (gen[:5] + ["{full}/gen", "--n", "4", "--limit", "6"], "error",
                                      "no space left", None, None)

    filt = ["distill", "filter", "--input", "{ws}/kept.jsonl", "--out", "{out}/f"]
    for setting_, key in [("keep_per_prompt=-1", "keep_per_prompt"), ("keep_per_prompt=0", "keep_per_prompt"),
                          ("max_repetition=nan", "max_repetition"), ("max_repetition=2", "max_repetition"),
                          ("language=xx", "language"), ("ngram=0", "ngram"), ("bogus=1", "bogus"),
                          ("min_pass_rate=0.9", "min_pass_rate")]:
        extra = ["--set", "max_pass_rate=0.1"] if setting_.startswith("min_pass") else []
        c[f"filter {setting_}"] = (filt + ["--set", setting_] + extra, "error", key, "f", None)
    c["filter missing input"] = (["distill", "filter", "--input", "{ws}/nope", "--out", "{out}/f"], "error", "nope",
                                 "f", None)
    c["filter input is not a generate output"] = (["distill", "filter", "--input", "{ws}/user_dir", "--out",
                                                   "{out}/f"], "error", "user_dir", "f", None)
    c["filter out is its input"] = (["distill", "filter", "--input", "{ws}/kept.jsonl", "--out", "{ws}"], "error",
                                    "input", None, None)
    c["filter into a user's directory"] = (filt[:-1] + ["{ws}/user_dir"], "error", "user_dir", None, None)
    c["filter binary input"] = (["distill", "filter", "--input", "{ws}/binary.jsonl", "--out", "{out}/f"], "error",
                                "rejects.jsonl", "f", None)
    c["filter bad lines"] = (["distill", "filter", "--input", "{ws}/mixed_generated.jsonl", "--out", "{out}/f"],
                             "rejects", "bad_record", "f", "f/rejects.jsonl")

    exp = ["distill", "export", "--input", "{ws}/kept.jsonl", "--out", "{out}/e.jsonl"]
    c["export bad format"] = (exp + ["--format", "xml"], "error", "format", "e.jsonl", None)
    c["export bad kinds"] = (exp + ["--kinds", "all"], "error", "kinds", "e.jsonl", None)
    c["export missing input"] = (["distill", "export", "--input", "{ws}/nope.jsonl", "--out", "{out}/e.jsonl"],
                                 "error", "nope.jsonl", "e.jsonl", None)
    c["export hf into a user's directory"] = (exp[:-1] + ["{ws}/user_dir", "--format", "hf"], "error", "user_dir",
                                              None, None)
    c["export out is the input"] = (exp[:-1] + ["{ws}/kept.jsonl"], "error", "kept.jsonl", None, None)
    c["export bad lines"] = (["distill", "export", "--input", "{ws}/mixed_kept.jsonl", "--out", "{out}/e.jsonl"],
                             "rejects", "completion", "e.jsonl", "e.jsonl.rejects.jsonl")
    c["export all bad"] = (["distill", "export", "--input", "{ws}/binary.jsonl", "--out", "{out}/e.jsonl"], "error",
                           "rejects", "e.jsonl", None)

    sft = ["sft", "--config", "{ws}/sft.yaml", "output_dir={out}/sft"]
    for key, values in [("train.lr", ("0", "-1", NAN)), ("train.batch_size", ("0", "-1")), ("train.grad_accum", ("0",)),
                        ("train.max_steps", ("0", "-2")), ("train.epochs", ("0", NAN)), ("train.warmup_steps", ("-1",)),
                        ("train.max_grad_norm", ("0",)), ("train.weight_decay", ("-0.1",)),
                        ("data.max_length", ("0", "1")), ("data.num_proc", ("0",)), ("lora.r", ("0",)),
                        ("lora.dropout", ("1",)), ("data.sources.0.weight", ("-1", NAN)),
                        ("train.keep_checkpoints", ("0",)), ("train.expert_parallel", ("0",))]:
        for v in values:
            c[f"sft {key}={v}"] = (sft + [f"{key}={v}"], "error", key, "sft", None)
    c["sft train.mixed_precision=fp64"] = (sft + ["train.mixed_precision=fp64"], "error", "mixed_precision", "sft", None)
    c["sft kernels.fp8_gemm=fastest"] = (sft + ["train.kernels.fp8_gemm=fastest"], "error", "fp8_gemm", "sft", None)
    c["sft train.out_dir set"] = (sft + ["train.out_dir=/tmp/elsewhere"], "error", "train.out_dir", "sft", None)
    c["sft unknown key"] = (sft + ["train.lrr=1"], "error", "train.lrr", "sft", None)
    c["sft wrong type"] = (sft + ["train.batch_size=four"], "error", "train.batch_size", "sft", None)
    c["sft missing config"] = (["sft", "--config", "{ws}/nope.yaml"], "error", "nope.yaml", None, None)
    c["sft config not yaml"] = (["sft", "--config", "{ws}/broken.yaml"], "error", "broken.yaml", None, None)
    c["sft config is a list"] = (["sft", "--config", "{ws}/list.yaml"], "error", "list.yaml", None, None)
    c["sft config is a directory"] = (["sft", "--config", "{ws}/user_dir"], "error", "user_dir", None, None)
    c["sft missing data"] = (sft + ["data.sources.0.path={ws}/nope.jsonl"], "error", "nope.jsonl", "sft", None)
    c["sft corrupt model"] = (sft + ["model.path={ws}/corrupt"], "error", "model.safetensors", "sft", None)
    c["sft truncated model"] = (sft + ["model.path={ws}/truncated"], "error", "model.safetensors", "sft", None)
    c["sft inconsistent config.json"] = (sft + ["model.path={ws}/inconsistent"], "error", "n_group", "sft", None)
    c["sft into a user's directory"] = (sft[:-1] + ["output_dir={ws}/user_dir"], "error", "user_dir", None, None)
    c["sft output holds its data"] = (sft[:-1] + ["output_dir={ws}"], "error", "input", None, None)
    c["sft all rows bad"] = (sft + ["data.sources.0.path={ws}/bad_chats.jsonl"], "error", "data_rejects.jsonl",
                             "sft", None)
    c["sft some rows bad"] = (sft + ["data.sources.0.path={ws}/mixed_chats.jsonl"], "rejects", "assistant", "sft",
                              "sft/data_rejects.jsonl")

    rm = ["rm", "train", "--config", "{ws}/rm.yaml", "output_dir={out}/rm"]
    c["rm eval_fraction=1.5"] = (rm + ["data.eval_fraction=1.5"], "error", "eval_fraction", "rm", None)
    c["rm no training data"] = (rm + ["data.train=[]"], "error", "data.train", "rm", None)
    c["rm missing model"] = (rm + ["model.path={ws}/nope"], "error", "nope", "rm", None)
    c["rm overlong=chop"] = (rm + ["data.overlong=chop"], "error", "overlong", "rm", None)
    c["rm into a user's directory"] = (rm[:-1] + ["output_dir={ws}/user_dir"], "error", "user_dir", None, None)
    c["rm bad pairs"] = (rm + ["data.train.0.path={ws}/mixed_pairs.jsonl"], "rejects", "margin", "rm",
                         "rm/skipped_pairs.jsonl")

    ev = ["rm", "eval", "--model", "{ws}/rm", "--data", "{ws}/pairs.jsonl", "--out", "{out}/ev"]
    c["rm eval of a policy (no reward head)"] = (ev[:3] + ["{ws}/policy"] + ev[4:], "error", "score.weight", "ev", None)
    c["rm eval missing model"] = (ev[:3] + ["{ws}/nope"] + ev[4:], "error", "nope", "ev", None)
    c["rm eval missing data"] = (ev[:5] + ["{ws}/nope.jsonl"] + ev[6:], "error", "nope.jsonl", "ev", None)
    for opt, v, key in [("--batch-size", "0", "batch_size"), ("--max-length", "0", "max_length"),
                        ("--overlong", "chop", "overlong"), ("--limit", "0", "limit")]:
        c[f"rm eval {opt}={v}"] = (ev + [opt, v], "error", key, "ev", None)
    c["rm eval into a user's directory"] = (ev[:-1] + ["{ws}/user_dir"], "error", "user_dir", None, None)
    c["rm eval all pairs bad"] = (ev[:5] + ["{ws}/binary.jsonl"] + ev[6:], "error", "skipped.jsonl", "ev", None)
    c["rm serve a policy"] = (["rm", "serve", "--model", "{ws}/policy", "--port", "0"], "error", "score.weight",
                              None, None)
    c["rm serve port 70000"] = (["rm", "serve", "--model", "{ws}/rm", "--port", "70000"], "error", "port", None, None)

    grpo = ["grpo", "--config", "{ws}/grpo.yaml", "output_dir={out}/g"]
    c["grpo no rewards"] = (grpo + ["rewards={{}}"], "error", "rewards", "g", None)
    c["grpo unknown reward"] = (grpo + ["rewards={{nope: 1.0}}"], "error", "rewards.nope", "g", None)
    c["grpo NaN weight"] = (grpo + ["rewards={{math: .nan}}"], "error", "rewards.math", "g", None)
    c["grpo options of no reward"] = (grpo + ["reward_options={{code: {{}}}}"], "error", "reward_options.code", "g", None)
    c["grpo accuracy_reward without solution"] = (grpo + ["rewards={{trl.rewards:accuracy_reward: 1.0}}"], "error",
                                                  "solution", "g", None)
    for key, v in [("grpo.group_size", "1"), ("grpo.loss.clip_low", "-0.1"), ("grpo.loss.clip_low", "1"),
                   ("grpo.loss.aggregation", "mean"), ("grpo.loss.tis_cap", "0.5"), ("iterations", "0"),
                   ("grpo.temperature", "0"), ("grpo.advantage_scale", "rank"), ("engine", "sglang"),
                   ("vllm.gpu_memory_utilization", "2"), ("grpo.loss.correction", "clip"),
                   ("grpo.loss.correction_max", "0"), ("grpo.loss.correction_level", "batch"),
                   ("grpo.loss.ratio_level", "seq"), ("grpo.loss.surrogate", "ppo"), ("grpo.loss.cispo_cap", "-1"),
                   ("grpo.loss.off_policy_mask", "-0.1"), ("grpo.loss.max_completion_len", "0"),
                   ("grpo.routing_replay", "r2")]:
        c[f"grpo {key}={v}"] = (grpo + [f"{key}={v}"], "error", key, "g", None)
    c["grpo correction bounds crossed"] = (grpo + ["grpo.loss.correction_min=3", "grpo.loss.correction_max=2"],
                                           "error", "correction_min", "g", None)
    c["grpo icepop at sequence level"] = (grpo + ["grpo.loss.correction=icepop",
                                                  "grpo.loss.correction_level=sequence"], "error", "icepop", "g", None)
    c["grpo checkpoint inside an iteration"] = (grpo + ["grpo.updates_per_batch=2", "train.save_every=3"], "error",
                                                "train.save_every", "g", None)
    c["grpo top_p with a correction"] = (grpo + ["grpo.top_p=0.9"], "error", "grpo.top_p", "g", None)
    c["grpo train.batch_size"] = (grpo + ["train.batch_size=4"], "error", "train.batch_size", "g", None)
    c["grpo more prompts per step than prompts"] = (grpo + ["grpo.prompts_per_step=100000"], "error",
                                                    "prompts_per_step", "g", None)
    c["grpo r3 with a vllm server"] = (grpo + ["grpo.routing_replay=r3", "engine=vllm-server"], "error",
                                       "routing_replay", "g", None)
    c["grpo missing prompts"] = (grpo + ["prompts.source={ws}/nope.jsonl"], "error", "nope.jsonl", "g", None)
    c["grpo into a user's directory"] = (grpo[:-1] + ["output_dir={ws}/user_dir"], "error", "user_dir", None, None)

    conv = ["model", "convert", "{ws}/policy", "{out}/c", "--to", "fp8"]
    c["convert to int4"] = (conv[:-1] + ["int4"], "error", "to", "c", None)
    c["convert missing src"] = (["model", "convert", "{ws}/nope", "{out}/c", "--to", "fp8"], "error", "nope", "c", None)
    c["convert corrupt src"] = (["model", "convert", "{ws}/corrupt", "{out}/c", "--to", "fp8"], "error",
                                "model.safetensors", "c", None)
    c["convert onto src"] = (["model", "convert", "{ws}/policy", "{ws}/policy", "--to", "fp8"], "error", "policy",
                             None, None)
    c["convert into a user's directory"] = (["model", "convert", "{ws}/policy", "{ws}/user_dir", "--to", "fp8"],
                                            "error", "user_dir", None, None)
    c["info not json"] = (["model", "info", "{ws}/notjson.json"], "error", "notjson.json", None, None)
    c["info no config"] = (["model", "info", "{ws}/noconfig"], "error", "noconfig", None, None)
    c["info kv-bytes 0"] = (["model", "info", "{ws}/policy", "--kv-bytes", "0"], "error", "kv_bytes", None, None)
    c["demo into a user's directory"] = (["demo", "--out", "{ws}/user_dir"], "error", "user_dir", None, None)
    c["demo seed nan"] = (["demo", "--out", "{out}/d", "--seed", NAN], "error", "seed", "d", None)
    return c


CASES = cases()


@pytest.fixture(scope="module")
def mixed(ws):
    """Files with good and bad records side by side."""
    good = json.dumps({"problem": "What is 1 + 1?", "answer": "2"})
    (ws / "mixed_prompts.jsonl").write_bytes(
        (good + "\n" + '{"problem": 7}\n' + "{broken\n" + '{"answer": "3"}\n').encode() + b"\xff\xfe\n")
    record = {"completion": "<think>x</think> \\boxed{2}", "problem": "q", "prompt_id": "p1", "answer": "2"}
    (ws / "mixed_generated.jsonl").write_text(json.dumps(record) + "\n[1, 2]\n" + '{"completion": 3}\n')
    kept = json.loads((ws / "kept.jsonl").read_text().splitlines()[0])
    (ws / "mixed_kept.jsonl").write_text(json.dumps(kept) + "\n" + json.dumps({**kept, "completion": None}) + "\n")
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad_chats = [{"messages": [{"role": "wizard", "content": "q"}]}, {"messages": "hello"},
                 {"messages": [{"role": "user", "content": "only a question"}]},
                 {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}, {"text": "x"}]
    (ws / "bad_chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad_chats) + "{broken\n")
    (ws / "mixed_chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [chat] * 6 + bad_chats[2:3])
                                          + '{"messages": "\\ud800"}\n')
    pairs = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(6)]
    pairs += [{"prompt": "q", "chosen": "same", "rejected": "same"},
              {"prompt": "q", "chosen": "a", "rejected": "b", "margin": float("nan")}]
    (ws / "mixed_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs).replace("NaN", "NaN"))
    return ws


def test_the_corpus_is_large_and_covers_every_command():
    assert len(CASES) >= 80
    commands = {" ".join(a for a in argv[:2] if not a.startswith("-")) for argv, *_ in CASES.values()}
    for needed in ("reward score", "distill generate", "distill filter", "distill export", "sft", "rm train",
                   "rm eval", "rm serve", "grpo", "model convert", "model info", "demo"):
        assert needed in commands, needed


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, ws, mixed, readonly, full, tmp_path, capsys, monkeypatch):
    argv, expect, mentions, output, rejects = CASES[name]
    monkeypatch.setenv("TQDM_DISABLE", "1")
    fill = lambda a: a.format(ws=ws, out=tmp_path, ro=readonly, full=full)  # noqa: E731
    argv = [fill(a) for a in argv]
    before_ws = _snapshot(ws, None)
    before_case = _snapshot(tmp_path, tmp_path / output if output else None)
    code = cli(argv)  # an exception here (a traceback for the user) fails the case
    err = capsys.readouterr().err
    if expect == "error":
        lines = [l for l in err.splitlines() if l.strip()]
        assert code == 2, (code, err)
        assert lines and lines[-1].startswith("posttrain: error:"), err
        assert len([l for l in lines if l.startswith("posttrain: error:")]) == 1 and "Traceback" not in err
        assert mentions in lines[-1], lines[-1]
    else:
        assert code == 0, err
        rows = [json.loads(l) for l in (tmp_path / rejects).read_text().splitlines()]
        assert rows and all(r.get("reason") or r.get("reject_reason") for r in rows), rows
        assert any(mentions in (r.get("reason") or r.get("reject_reason")) for r in rows), rows
    assert _snapshot(ws, None) == before_ws, "an input changed"
    assert _snapshot(tmp_path, tmp_path / output if output else None) == before_case, "something beside the output changed"
    assert (ws / "user_dir" / "thesis.txt").read_text() == "years of work"


def test_overwrite_writes_into_a_users_directory_and_removes_nothing(ws, mixed, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    (user / "checkpoints" / "step-99999999").mkdir(parents=True)
    (user / "checkpoints" / "step-99999999" / "mine.bin").write_text("not a checkpoint of the loop")
    assert cli(["distill", "export", "--input", str(ws / "kept.jsonl"), "--out", str(user), "--format", "hf",
                "--overwrite"]) == 0
    assert (user / "notes.txt").read_text() == "keep me" and (user / "state.json").exists()
    sft = tmp_path / "sft_in_mine"
    shutil.copytree(user, sft)
    cfg = ["sft", "--config", str(ws / "sft.yaml"), f"output_dir={sft}", "train.max_steps=3", "train.save_every=1",
           "train.keep_checkpoints=1", "--overwrite"]
    # the export's record names another stage: --overwrite is still needed, and rotation spares the user's step-*
    assert cli(cfg) == 0, capsys.readouterr().err
    assert (sft / "checkpoints" / "step-99999999" / "mine.bin").exists()
    assert len([p for p in (sft / "checkpoints").glob("step-*")]) == 2  # the user's and the loop's last


def test_rerun_with_changed_settings_is_refused_naming_the_key(ws, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    base = ["sft", "--config", str(ws / "sft.yaml"), f"output_dir={tmp_path / 'run'}"]
    assert cli(base) == 0
    final = (tmp_path / "run" / "final" / "model.safetensors").read_bytes()
    assert cli(base + ["train.lr=5e-4"]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err.splitlines()[-1] and "--restart" in err
    assert (tmp_path / "run" / "final" / "model.safetensors").read_bytes() == final  # nothing was touched
    assert cli(base + ["train.progress=true"]) == 0  # how a run is watched is not a setting of the run
    assert cli(base + ["train.lr=5e-4", "--restart"]) == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").read_bytes() != final
    (ws / "sft_changed.jsonl").write_text((ws / "sft.jsonl").read_text() + json.dumps(
        {"messages": [{"role": "user", "content": "new"}, {"role": "assistant", "content": "row"}]}) + "\n")
    try:
        assert cli(base[:3] + ["data.sources.0.path=" + str(ws / "sft_changed.jsonl"), base[3], "train.lr=5e-4"]) == 2
        assert "data.sources.0.path" in capsys.readouterr().err
    finally:
        (ws / "sft_changed.jsonl").unlink()


def test_unmapped_gold_answers_are_reported_at_start(ws, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert cli(["distill", "generate", "--prompts", str(ws / "prompts_gold_unmapped.jsonl"), "--map",
                "problem=question", "--out", str(tmp_path / "g"), "--n", "1", "--max-tokens", "32"]) == 0
    err = capsys.readouterr().err
    assert "solution" in err and "answer=solution" in err
    assert json.loads((tmp_path / "g" / "summary.json").read_text())["unmapped_gold_fields"] == ["solution"]


def test_debug_shows_the_traceback(ws, tmp_path):
    with pytest.raises(Exception, match="sampling.n"):
        cli(["--debug", "distill", "generate", "--prompts", str(ws / "prompts.jsonl"), "--out", str(tmp_path / "g"),
             "--n", "0"])


def test_every_numeric_setting_refuses_nan():
    """NaN is never a setting: each float field of every command's config says so, by key."""
    import dataclasses
    import typing

    from posttrain.config import ConfigError, build
    from posttrain.stages import configs

    checked = 0
    for cls in (getattr(configs, n) for n in configs.__all__):
        def walk(c, prefix):
            nonlocal checked
            for f in dataclasses.fields(c):
                hint = typing.get_type_hints(c)[f.name]
                target = next((a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)), None)
                args = typing.get_args(hint)
                if typing.get_origin(hint) is list and args and dataclasses.is_dataclass(args[0]):
                    walk(args[0], prefix + [f.name, "0"])
                elif target is not None:
                    walk(target, prefix + [f.name])
                elif float in (hint, *typing.get_args(hint)) and f.init and "internal" not in f.metadata:
                    data: dict = {}
                    node = data
                    for k, p in enumerate(prefix):
                        if p == "0":
                            continue
                        if k + 1 < len(prefix) and prefix[k + 1] == "0":
                            node[p] = [{}]
                            node = node[p][0]
                        else:
                            node = node.setdefault(p, {})
                    node[f.name] = math.nan
                    with pytest.raises(ConfigError, match=".".join(prefix + [f.name])):
                        build(cls, data)
                    checked += 1
        walk(cls, [])
    assert checked >= 25
