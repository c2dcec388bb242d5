"""TRL's reward convention, both ways, against TRL itself:

* every function in `trl.rewards` runs unchanged in a real `posttrain grpo` iteration (torch
  engine) and gives, sample for sample, what TRL's GRPOTrainer computes on the same completions;
* posttrain's math, format and overlong rewards run in `trl.GRPOTrainer.train()` (they get chat
  messages, `completion_ids` and the dataset's columns by keyword; overlong counts tokens);
* with None ("not applicable") rewards in a group, the advantages are TRL's.
"""

import inspect
import json
import math
import os

import pytest
import torch

from posttrain.embedded import build_tokenizer
from posttrain.model import ModelArgs, Transformer, save_checkpoint
from posttrain.paths import model_config

FACTORY_OPTIONS = {"get_cosine_scaled_reward": {"max_len": 12},
                   "get_soft_overlong_punishment": {"max_completion_len": 12, "soft_punish_cache": 4}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny DeepSeek-V3 (posttrain's HF checkpoint, which transformers and TRL load) and its
    tokenizer. TRL is imported here, not when the module is collected: it imports vLLM, which
    changes Triton's state for every test that runs after it."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func (replaying completions) is experimental
    pytest.importorskip("trl")
    cfg = json.loads(model_config("tiny").read_text())
    cfg.update(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
               n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=32,
               kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)
    args = ModelArgs.from_hf_config(cfg)
    torch.manual_seed(0)
    tok = build_tokenizer(args.vocab_size)
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    save_checkpoint(Transformer(args), args, path, tokenizer=tok)
    return path, tok


def _trl_reward_functions() -> dict:
    import trl.rewards as R

    out = {}
    for name in R.__all__:
        obj = getattr(R, name)
        if inspect.isfunction(obj):
            out[name] = obj(**FACTORY_OPTIONS.get(name, {})) if name.startswith("get_") else obj
    return out


def _trainer(tiny, out, reward_funcs, dataset, rollout_func=None, trainer_cls=None, batch=4, group=4):
    from trl import GRPOConfig, GRPOTrainer

    path, tok = tiny
    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=batch, num_generations=group,
                      max_completion_length=12, max_steps=1, learning_rate=1e-6, report_to=[], use_cpu=True,
                      logging_steps=1, save_strategy="no", bf16=False, seed=0)
    return (trainer_cls or GRPOTrainer)(model=str(path), reward_funcs=reward_funcs, args=args, train_dataset=dataset,
                                        processing_class=tok, rollout_func=rollout_func)


class _Recorder:
    """Passes a reward through untouched and keeps what it was given and what it returned."""

    def __init__(self, fn):
        self.fn, self.__name__, self.calls = fn, fn.__name__, []

    def __call__(self, **kwargs):
        out = self.fn(**kwargs)
        self.calls.append((kwargs, out))
        return out


def test_posttrain_rewards_run_in_trl_grpo_trainer(tiny, tmp_path):
    import reward
    from datasets import Dataset

    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}], "answer": str(2 * i)}
                                 for i in range(4)])
    recorders = [_Recorder(reward.get("math")), _Recorder(reward.get("format")),
                 _Recorder(reward.get("overlong", max_length=10, cache_length=4))]
    trainer = _trainer(tiny, tmp_path, recorders, dataset)
    trainer.train()
    logged = trainer.state.log_history[0]
    for rec in recorders:
        assert rec.calls, rec.__name__
        kwargs, values = rec.calls[0]
        assert isinstance(kwargs["completions"][0], list) and kwargs["completions"][0][0]["role"] == "assistant"
        assert len(kwargs["completion_ids"]) == len(values) == 4 and kwargs["answer"][0] in "0246"
        assert f"rewards/{rec.__name__}/mean" in logged
    kwargs, values = recorders[2].calls[0]
    # DAPO's overlong penalty on token counts (0 up to 6 tokens, then down to -1 at 10)
    expected = [0.0 if n <= 6 else (6 - n) / 4 if n <= 10 else -1.0 for n in map(len, kwargs["completion_ids"])]
    assert values == pytest.approx(expected)
    assert logged["rewards/overlong/mean"] == pytest.approx(sum(expected) / 4, abs=1e-6)


def test_trl_rewards_in_a_posttrain_grpo_iteration_equal_trls(tiny, tmp_path):
    from posttrain.stages.grpo import grpo_config, run_grpo

    fns = _trl_reward_functions()
    assert {"accuracy_reward", "think_format_reward", "get_soft_overlong_punishment"} <= set(fns)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"problem": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1),
                                           "solution": f"${2 * i + 1}$"}) + "\n" for i in range(8)))
    cfg = grpo_config({
        "model": {"path": str(tiny[0])},
        "prompts": {"source": str(prompts), "eval_source": str(prompts), "eval_limit": 2},
        "rewards": {f"trl.rewards:{name}": 1.0 for name in fns},
        "reward_options": {f"trl.rewards:{name}": opts for name, opts in FACTORY_OPTIONS.items()},
        "grpo": {"group_size": 4, "prompts_per_step": 2, "max_new_tokens": 12, "dynamic_sampling": False,
                 "mask_truncated": False},
        "iterations": 1, "eval_max_new_tokens": 4,
        "train": {"lr": 1e-6, "report_to": ["jsonl"], "progress": False}, "output_dir": str(tmp_path / "run")})
    run_grpo(cfg)
    rows = [json.loads(l) for l in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 8

    # TRL's GRPOTrainer scores the very same completions (replayed through its rollout_func)
    from datasets import Dataset

    by_id = {f"prompts-{n}": json.loads(l) for n, l in enumerate(prompts.read_text().splitlines(), start=1)}
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": by_id[r["prompt_id"]]["problem"]}],
                                  "answer": by_id[r["prompt_id"]]["answer"],
                                  "solution": by_id[r["prompt_id"]]["solution"]} for r in rows[::4]])

    order = []

    def replay(trl_prompts, trainer):
        """TRL's batch, in TRL's order, filled with posttrain's samples of each prompt."""
        left = {p: [r for r in rows if by_id[r["prompt_id"]]["problem"] == p] for p in {m[-1]["content"] for m in trl_prompts}}
        order[:] = [left[m[-1]["content"]].pop(0) for m in trl_prompts]
        return {"prompt_ids": [[1]] * len(order), "completion_ids": [r["completion_ids"] for r in order],
                "logprobs": None}

    recorders = {name: _Recorder(fn) for name, fn in _trl_reward_functions().items()}
    for name, rec in recorders.items():
        rec.__name__ = name
    trainer = _trainer(tiny, tmp_path / "trl", list(recorders.values()), dataset, rollout_func=replay, batch=8)
    trainer.train()
    assert len(order) == 8
    for name, rec in recorders.items():
        kwargs, theirs = rec.calls[0]
        assert [c[0]["content"] for c in kwargs["completions"]] == [r["completion"] for r in order]
        ours = [r["rewards"][f"trl.rewards:{name}"] for r in order]
        assert ours == pytest.approx(theirs, abs=1e-9), name


def _advantage_recording_trainer():
    from trl import GRPOTrainer

    class Recording(GRPOTrainer):
        """Keeps the advantages of each generation batch, in generation order (before TRL
        shuffles the batch into micro-batches)."""
        advantages: list = []

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            type(self).advantages.append(out["advantages"].detach().cpu().clone())
            return out

    return Recording


def test_advantages_with_none_rewards_equal_trls(tiny, tmp_path):
    from datasets import Dataset

    from posttrain.rollout import Rollout, assign_advantages, score_rollouts

    nan = None
    # two reward functions over two groups of four; None = not applicable
    first = [1.0, nan, 0.0, 0.5, nan, nan, 2.0, nan]
    second = [nan, nan, 1.0, nan, nan, nan, nan, nan]
    weights = {"first": 1.0, "second": 0.5}

    def make(values, name):
        def fn(completions, idx, **kwargs):
            return [values[i] for i in idx]
        fn.__name__ = name
        return fn

    fns = {"first": make(first, "first"), "second": make(second, "second")}
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"q{g}"}], "group": g} for g in range(2)])
    idx = list(range(8))

    def replay(trl_prompts, trainer):
        return {"prompt_ids": [[1]] * 8, "completion_ids": [[5, 6, 7]] * 8, "logprobs": None, "idx": idx}

    Recording = _advantage_recording_trainer()
    Recording.advantages = []

    trainer = _trainer(tiny, tmp_path, list(fns.values()), dataset, rollout_func=replay, trainer_cls=Recording, batch=8)
    trainer.args.reward_weights = [weights["first"], weights["second"]]
    trainer.reward_weights = torch.tensor(trainer.args.reward_weights, dtype=torch.float32)
    trainer.train()
    theirs = torch.cat(Recording.advantages).tolist()

    rollouts = [Rollout(f"q{i // 4}", [{"role": "user", "content": f"q{i // 4}"}], [1], [5, 6, 7], "", "length",
                        columns={"idx": i}) for i in idx]
    score_rollouts(rollouts, fns, weights)
    assign_advantages(rollouts, 4, "group")
    ours = [r.advantage for r in rollouts]
    assert ours == pytest.approx(theirs, abs=1e-5)
    assert ours[1] == 0.0 and ours[4:] == [0.0] * 4 and not any(math.isnan(a) for a in ours)
