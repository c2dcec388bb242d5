"""`posttrain demo`: the pipeline end to end on the embedded default, on a laptop CPU.

The embedded default carries everything (no network): configs/model/tiny.json (every
architecture feature on), a tokenizer trained locally, and a synthetic arithmetic task.
Each stage adds its part and one key to DIR/summary.json; stages that are not built yet are
listed as such, so the demo never claims more than it ran.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from posttrain.io_utils import atomic_write_json
from posttrain.model import ModelArgs, Transformer, save_checkpoint
from posttrain.model.counting import count_parameters
from posttrain.model.generate import SamplingParams, generate
from posttrain.paths import model_config

# Later stages, in pipeline order; each one's issue adds it to the demo.
PENDING_STAGES: tuple[str, ...] = ()

# The demo's task level: what a tiny model trained from scratch for a few CPU minutes can learn
# (operands 1 to 5, one operation). Harder levels are the same code with more compute.
DEMO_LEVEL = {"min_ops": 1, "max_ops": 1, "max_operand": 5}
DISTILL_PROMPTS = 1500     # at most; the level has fewer distinct questions. x 4 teacher samples each
HELDOUT_PROMPTS = 100


def _training_batch(tokenizer, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-formatted problems with their worked steps; loss on the assistant part only."""
    from posttrain.embedded import make_problems

    rows = []
    for p in make_problems(n, seed=seed):
        answer = "<think>\n" + "\n".join(p.steps) + "\n</think>\n" + f"The answer is \\boxed{{{p.answer}}}."
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": p.question}, {"role": "assistant", "content": answer}],
            tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
        )
        rows.append((enc["input_ids"], enc["assistant_masks"]))
    T = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((n, T), pad, dtype=torch.long)
    labels = torch.full((n, T), -100, dtype=torch.long)
    for b, (ids, mask) in enumerate(rows):
        ids_t, mask_t = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
        input_ids[b, : len(ids)] = ids_t
        # label at t is token t+1, kept only where token t+1 is assistant text
        target = torch.where(mask_t[1:], ids_t[1:], torch.tensor(-100))
        labels[b, : len(ids) - 1] = target
    return input_ids, labels


def _model_stage(out: Path, seed: int) -> dict:
    from posttrain.embedded import build_tokenizer, make_problems

    torch.manual_seed(seed)
    args = ModelArgs.from_json(model_config("tiny"))
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(vocab_size=args.vocab_size)
    print(f"[model] tokenizer built locally: {len(tokenizer)} tokens in {time.perf_counter() - t0:.2f}s")
    model = Transformer(args)
    counts = count_parameters(args)
    print(f"[model] tiny DeepSeek-V3: {counts.total / 1e6:.2f}M parameters "
          f"({counts.active / 1e6:.2f}M activated), MTP {counts.mtp / 1e6:.2f}M")

    input_ids, labels = _training_batch(tokenizer, n=8, seed=seed)
    model.train()
    times = []
    for _ in range(4):  # the first step includes one-off kernel set-up; report the median of the rest
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        o = model.compute(input_ids, labels=labels)
        loss = o.loss + 0.3 * torch.stack(o.mtp_losses).mean() + o.balance_loss
        loss.backward()
        times.append(time.perf_counter() - t)
    fb_s = statistics.median(times[1:])
    print(f"[model] forward+backward on {tuple(input_ids.shape)} tokens: {fb_s * 1e3:.0f} ms "
          f"(loss {o.loss.item():.3f}, MTP {[round(l.item(), 3) for l in o.mtp_losses]}, "
          f"balance {o.balance_loss.item():.2e})")

    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p.question}], tokenize=True,
                                      add_generation_prompt=True, return_dict=True)["input_ids"]
        for p in make_problems(4, seed=seed + 1)
    ]
    params = SamplingParams(max_new_tokens=48, temperature=0.8, top_p=0.95, seed=seed,
                            stop_token_ids=(tokenizer.eos_token_id,))
    t = time.perf_counter()
    gens = generate(model, prompts, params, pad_token_id=tokenizer.pad_token_id)
    gen_s = time.perf_counter() - t
    n_new = sum(len(g.token_ids) for g in gens)
    print(f"[model] generated {n_new} tokens for {len(prompts)} prompts (KV cache, absorbed MLA): "
          f"{n_new / gen_s:.0f} tokens/s; untrained sample: {tokenizer.decode(gens[0].token_ids)[:60]!r}")

    ckpt = save_checkpoint(model, args, out / "checkpoints" / "init", tokenizer=tokenizer)
    print(f"[model] initial checkpoint (HF format) written to {ckpt}")
    return {
        "params_total": counts.total,
        "params_active": counts.active,
        "forward_backward_s": round(fb_s, 4),
        "generate_tokens_per_s": round(n_new / gen_s, 1),
    }


def _reward_stage(seed: int) -> dict:
    """The rule-based rewards on worked solutions of the synthetic task: right answers, wrong
    answers and unfinished reasoning must be told apart."""
    import reward
    from posttrain.embedded import make_problems

    problems = make_problems(60, seed=seed + 2)
    completions, golds, expected = [], [], []
    for i, p in enumerate(problems):
        steps = "\n".join(p.steps)
        kind = i % 3
        answer = p.answer if kind == 0 else str(int(p.answer) + 1 + i % 7)
        text = f"<think>\n{steps}\n</think>\nThe answer is \\boxed{{{answer}}}."
        if kind == 2:
            text = f"<think>\n{steps}\nWait, let me check \\boxed{{{p.answer}}} again"  # never finished
        completions.append(text)
        golds.append(p.answer)
        expected.append(1.0 if kind == 0 else 0.0)
    math_reward, fmt = reward.get("math"), reward.get("format")
    t = time.perf_counter()
    scores = math_reward(None, completions, answer=golds)
    per_s = len(completions) / (time.perf_counter() - t)
    formats = fmt(None, completions)
    agree = sum(s == e for s, e in zip(scores, expected))
    print(f"[reward] math reward agrees with the truth on {agree}/{len(completions)} worked solutions "
          f"(right, wrong and unfinished); format reward passes {int(sum(formats))}; {per_s:.0f} scored/s")
    return {"scored": len(completions), "agree_with_truth": agree, "format_ok": int(sum(formats)),
            "per_s": round(per_s, 1)}


def _distill_stage(out: Path, seed: int, prompts: list, restart: bool = False) -> dict:
    """generate -> filter -> export with the scripted R1-style teacher on synthetic prompts."""
    from data_recipes.distill_filters import FilterConfig
    from posttrain.embedded import build_tokenizer
    from posttrain.embedded.teacher import ScriptedTeacher
    from posttrain.engines import SamplingConfig
    from posttrain.stages.distill_export import export
    from posttrain.stages.distill_filter import run_filter
    from posttrain.stages.distill_generate import generate, remove_generated

    teacher = ScriptedTeacher(build_tokenizer())
    if restart:
        remove_generated(out / "distill" / "generated")
    t = time.perf_counter()
    # No system prompt: on a tiny model trained on a CPU, R1's 60-token system prompt would be a
    # third of every sample's compute and teach nothing the format does not.
    gen = generate(prompts, teacher, SamplingConfig(n=4, max_tokens=1024, seed=seed), out / "distill" / "generated",
                   system_prompt=None, progress=False)
    filt = run_filter(out / "distill" / "generated", out / "distill" / "filtered", FilterConfig(keep_per_prompt=2))
    exp = export(out / "distill" / "filtered", out / "distill" / "sft.jsonl", kinds="r1", system_prompt=None)
    reasons = ", ".join(f"{k} {v}" for k, v in filt["reasons"].items())
    print(f"[distill] {gen['samples']} samples from the scripted teacher for {len(prompts)} prompts; kept "
          f"{filt['kept']}, rejected {filt['rejected']} ({reasons}); {exp['rows']} SFT rows in {exp['output']} "
          f"({time.perf_counter() - t:.1f}s)")
    return {"generated": gen["samples"], "kept": filt["kept"], "rejected": filt["reasons"],
            "sft_rows": exp["rows"]}


def _demo_prompts(seed: int) -> tuple[list, list]:
    """(training prompts, held-out prompts): distinct questions of the demo level, the held-out
    ones never seen in training."""
    from data_recipes.prompt_sets import synthetic_prompts

    seen, distinct = set(), []
    for p in synthetic_prompts(3 * DISTILL_PROMPTS, seed=seed + 3, **DEMO_LEVEL):
        if p.problem not in seen:
            seen.add(p.problem)
            distinct.append(p)
    if len(distinct) < 2 * HELDOUT_PROMPTS:
        raise RuntimeError("the demo level has too few distinct problems for a held-out set")
    return distinct[HELDOUT_PROMPTS:HELDOUT_PROMPTS + DISTILL_PROMPTS], distinct[:HELDOUT_PROMPTS]


def _sft_stage(out: Path, seed: int, heldout: list, restart: bool = False) -> dict:
    """configs/sft/tiny.yaml on the exported distillation data; greedy held-out accuracy before/after."""
    from posttrain.config import apply_overrides, load_yaml
    from posttrain.engines.torch_engine import TorchEngine
    from posttrain.paths import shipped_config
    from posttrain.stages.math_eval import greedy_accuracy
    from posttrain.stages.sft import run_sft, sft_config

    t = time.perf_counter()
    before = greedy_accuracy(TorchEngine.from_checkpoint(out / "checkpoints" / "init", batch_size=50), heldout)
    data = apply_overrides(load_yaml(shipped_config("sft", "tiny.yaml")), [
        f"data.sources.0.path={out / 'distill' / 'sft.jsonl'}", f"output_dir={out / 'sft'}",
        f"data.cache_dir={out / '.cache' / 'sft'}", f"model.config={shipped_config('model', 'tiny.json')}",
        f"train.seed={seed}", "train.progress=false"])
    cfg = sft_config(data)
    print(f"[sft] training the tiny model on {out / 'distill' / 'sft.jsonl'} "
          f"({cfg.train.max_steps} steps of {cfg.train.batch_size} x {cfg.data.max_length} packed tokens)")
    result = run_sft(cfg, restart=restart)
    after = greedy_accuracy(TorchEngine.from_checkpoint(out / "sft" / "final", batch_size=50), heldout)
    wall = time.perf_counter() - t
    print(f"[sft] {result['steps']} steps, {result['tokens_per_s']:.0f} tokens/s; greedy accuracy on "
          f"{len(heldout)} held-out problems: {before['accuracy']:.0%} before -> {after['accuracy']:.0%} after "
          f"({wall:.0f}s)")
    print(f"[sft] e.g. {after['samples'][0]['problem']!r} -> {after['samples'][0]['completion'][-60:]!r}")
    return {"accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
            "train_tokens_per_s": round(result["tokens_per_s"], 1), "wall_s": round(wall, 1),
            "steps": result["steps"], "heldout": len(heldout), "packing_efficiency": result["data"]["packing_efficiency"]}


def _rm_stage(out: Path, seed: int, restart: bool = False) -> dict:
    """configs/rm/tiny.yaml: a reward model from the SFT checkpoint on verified-vs-wrong pairs
    from the distillation output; accuracy on held-out pairs."""
    from posttrain.config import apply_overrides, load_yaml
    from posttrain.paths import shipped_config
    from posttrain.stages.rm_train import rm_config, run_rm_train

    t = time.perf_counter()
    data = apply_overrides(load_yaml(shipped_config("rm", "tiny.yaml")), [
        f"model.path={out / 'sft' / 'final'}", f"data.train.0.path=distill:{out / 'distill' / 'filtered'}",
        f"output_dir={out / 'rm'}", f"train.seed={seed}", "train.progress=false"])
    result = run_rm_train(rm_config(data), restart=restart)
    ev = result["eval"]
    print(f"[rm] Bradley-Terry reward model on {result['data']['pairs_train']} verified-vs-wrong pairs: held-out "
          f"accuracy {ev['accuracy']:.0%} on {ev['pairs']} pairs ({time.perf_counter() - t:.0f}s); "
          f"report in {out / 'rm' / 'eval'}")
    return {"heldout_accuracy": ev["accuracy"], "pairs_train": result["data"]["pairs_train"],
            "pairs_eval": ev["pairs"], "wall_s": round(time.perf_counter() - t, 1)}


def _grpo_stage(out: Path, seed: int, train_prompts: list, heldout: list, restart: bool = False) -> dict:
    """configs/grpo/tiny.yaml from the SFT checkpoint with the math rule reward, on the demo's
    training questions; greedy accuracy on the SFT stage's held-out set, same decoding."""
    from posttrain.config import apply_overrides, load_yaml
    from posttrain.engines.vllm_engine import vllm_available
    from posttrain.paths import shipped_config
    from posttrain.stages.grpo import GRPORun, grpo_config

    # vLLM rollouts when it is installed (about twice the torch engine's sampled tokens/s here)
    engine = "vllm" if vllm_available() else "torch"
    data = apply_overrides(load_yaml(shipped_config("grpo", "tiny.yaml")), [
        f"model.path={out / 'sft' / 'final'}", f"output_dir={out / 'grpo'}", f"train.seed={seed}",
        "train.progress=false", "eval_max_new_tokens=256", f"engine={engine}"])
    cfg = grpo_config(data)
    print(f"[grpo] {cfg.iterations} iterations of {cfg.grpo.prompts_per_step} prompts x {cfg.grpo.group_size} "
          f"samples, math rule reward, {cfg.engine} engine")
    run = GRPORun(cfg, train_prompts, heldout, restart=restart)
    try:
        result = run.run()
    finally:
        run.close()
    print(f"[grpo] greedy accuracy on the {len(heldout)} held-out problems: {result['accuracy_before']:.0%} before -> "
          f"{result['accuracy_after']:.0%} after ({result['wall_s']:.0f}s); reward curve in "
          f"{out / 'grpo' / 'reward_curve.png'}")
    return {"accuracy_before": result["accuracy_before"], "accuracy_after": result["accuracy_after"],
            "wall_s": round(result["wall_s"], 1), "engine": result["engine"], "iterations": result["iterations"],
            "reward_curve": str(out / "grpo" / "reward_curve.png")}


def run_demo(out: Path, seed: int = 0, overwrite: bool = False, restart: bool = False) -> dict:
    from posttrain.outputs import claim_output
    from posttrain.stages.configs import DemoConfig

    claim = claim_output("demo", out, DemoConfig(str(out), seed), overwrite=overwrite, restart=restart)
    restart = claim.state == "restart"
    summary: dict = {"model": _model_stage(out, seed), "reward": _reward_stage(seed)}
    train_prompts, heldout = _demo_prompts(seed)
    summary["distill"] = _distill_stage(out, seed, train_prompts, restart)
    summary["sft"] = _sft_stage(out, seed, heldout, restart)
    summary["rm"] = _rm_stage(out, seed, restart)
    summary["grpo"] = _grpo_stage(out, seed, train_prompts, heldout, restart)
    if PENDING_STAGES:
        summary["not_built_yet"] = list(PENDING_STAGES)
    atomic_write_json(out / "summary.json", summary)
    print(f"\nsummary written to {out / 'summary.json'}")
    if PENDING_STAGES:
        print("stages not built yet: " + ", ".join(PENDING_STAGES))
    return summary
