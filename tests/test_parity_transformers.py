"""The core equals transformers' DeepseekV3ForCausalLM in both checkpoint directions (fp32, 1e-4)."""

import pytest
import torch
from transformers import DeepseekV3ForCausalLM

from helpers import hf_config, randomize_, small_args
from posttrain.model import Transformer, YarnScaling, load_checkpoint, save_checkpoint

TOL = 1e-4
CASES = {
    "q_lora+groups+yarn": dict(q_lora_rank=16, n_group=4, topk_group=2),
    "no_q_lora+groups+yarn": dict(q_lora_rank=None, n_group=4, topk_group=2),
    "q_lora+one_group+no_yarn": dict(q_lora_rank=16, n_group=1, topk_group=1, rope_scaling=None),
    "no_q_lora+one_group+no_yarn": dict(q_lora_rank=None, n_group=1, topk_group=1, rope_scaling=None),
    "yarn_release_mscale": dict(rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=32,
                                                          mscale=1.0, mscale_all_dim=1.0)),
}


def _consistent(overrides):
    # transformers warns unless max_position_embeddings = factor * original length
    rs = overrides.get("rope_scaling", small_args().rope_scaling)
    if rs is not None:
        overrides = {**overrides, "max_position_embeddings": int(rs.factor * rs.original_max_position_embeddings)}
    return overrides


@pytest.mark.parametrize("name", list(CASES))
def test_transformers_checkpoint_loads_with_same_logits(name, tmp_path):
    args = small_args(num_nextn_predict_layers=0, **_consistent(CASES[name]))
    torch.manual_seed(hash(name) % 1000)
    hf = randomize_(DeepseekV3ForCausalLM(hf_config(args)).float().eval(), seed=1)
    hf.save_pretrained(tmp_path)
    model, loaded_args = load_checkpoint(tmp_path, dtype=torch.float32)
    assert loaded_args.q_lora_rank == args.q_lora_rank and loaded_args.n_group == args.n_group
    ids = torch.randint(0, args.vocab_size, (2, 100))  # past original_max_position_embeddings: YaRN matters
    with torch.no_grad():
        ref = hf(ids).logits
        got = model.eval()(ids)
    err = (ref - got).abs().max().item()
    assert err <= TOL, f"{name}: max |logits diff| = {err:.2e}"
    assert ref.abs().max() > 0.5  # the comparison is not between near-zero logits


@pytest.mark.parametrize("name", list(CASES))
def test_posttrain_checkpoint_loads_in_transformers_with_same_logits(name, tmp_path):
    args = small_args(**_consistent(CASES[name]))  # with an MTP layer, which transformers skips
    model = randomize_(Transformer(args), seed=2).eval()
    save_checkpoint(model, args, tmp_path, dtype=torch.float32)
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, args.vocab_size, (3, 90))
    with torch.no_grad():
        err = (hf(ids).logits - model(ids)).abs().max().item()
    assert err <= TOL, f"{name}: max |logits diff| = {err:.2e}"


def test_yarn_changes_logits_beyond_original_context():
    """Guard for the parity tests: YaRN is really exercised at these lengths."""
    args = small_args()
    model = randomize_(Transformer(args), seed=3).eval()
    plain = randomize_(Transformer(small_args(rope_scaling=None)), seed=3).eval()
    ids = torch.randint(0, args.vocab_size, (1, 100))
    with torch.no_grad():
        assert (model(ids) - plain(ids)).abs().max() > 1e-2
