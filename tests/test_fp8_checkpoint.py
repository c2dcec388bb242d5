"""Blockwise FP8 checkpoints as the release stores them: e4m3 weights + one fp32 scale per 128x128 block."""

import json
import math

import pytest
import torch
from safetensors import safe_open

from helpers import randomize_, small_args
from posttrain.cli import main as cli
from posttrain.model import Transformer, load_checkpoint, save_checkpoint
from posttrain.model.fp8 import weight_dequant, weight_quant

# Dimensions that are not multiples of 128, so ragged edge blocks occur in every projection.
FP8_ARGS = dict(hidden_size=160, intermediate_size=200, moe_intermediate_size=136, kv_lora_rank=144,
                q_lora_rank=130, num_attention_heads=2, qk_nope_head_dim=40, qk_rope_head_dim=16, v_head_dim=24)


def _reference_dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Independent block loop; the product is taken in float32 as the release's dequant kernel does."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].to(torch.float32)
            out[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = blk * s[i, j]
    return out


def test_quant_roundtrip_error_is_within_e4m3_precision():
    w = torch.randn(300, 260) * torch.logspace(-3, 1, 260)  # columns of very different scale
    q, s = weight_quant(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (3, 3)
    deq = weight_dequant(q, s)
    assert torch.equal(deq, _reference_dequant(q, s))
    block_scale = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :260]
    # e4m3: 3 mantissa bits -> half-ulp 2^-4 relative; subnormals (|w/s| < 2^-6) -> 2^-10 absolute
    bound = torch.maximum(w.abs() * 2**-4, block_scale * 2**-10) * 1.0001
    assert ((w - deq).abs() <= bound).all()
    for i in range(3):  # every block's largest element maps to exactly +-448
        for j in range(3):
            blk = q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
            assert blk.abs().max() == 448


def test_fp8_checkpoint_loads_to_exact_dequantised_reference(tmp_path):
    args = small_args(**FP8_ARGS)
    model = randomize_(Transformer(args), seed=21).eval()
    save_checkpoint(model, args, tmp_path, dtype=torch.float32, fp8=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    loaded, _ = load_checkpoint(tmp_path, dtype=torch.float32)
    loaded_sd = loaded.state_dict()
    n_fp8 = 0
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for name in keys:
            t = f.get_tensor(name)
            if t.dtype != torch.float8_e4m3fn:
                assert not name.endswith("_proj.weight") or "eh_proj" in name or ".gate." in name
                continue
            n_fp8 += 1
            s = f.get_tensor(name.replace(".weight", ".weight_scale_inv"))
            assert s.shape == (math.ceil(t.shape[0] / 128), math.ceil(t.shape[1] / 128))
            ref = _reference_dequant(t, s).float()
            if ".mlp.experts." in name:
                layer, e, proj = name.split(".")[2], int(name.split(".")[5]), name.split(".")[6]
                prefix = f"layers.{layer}" if int(layer) < args.num_hidden_layers else f"mtp.{int(layer) - args.num_hidden_layers}"
                if proj == "down_proj":
                    got = loaded_sd[f"{prefix}.mlp.experts.down_proj"][e]
                else:  # [gate; up] rows of the expert's slice
                    got = loaded_sd[f"{prefix}.mlp.experts.gate_up_proj"][e].chunk(2)[proj == "up_proj"]
            else:
                layer, rest = int(name.split(".")[2]), name.split(".", 3)[3]
                prefix = f"layers.{layer}" if layer < args.num_hidden_layers else f"mtp.{layer - args.num_hidden_layers}"
                got = loaded_sd[f"{prefix}.{rest}"]
            assert torch.equal(got, ref), name
        # router, norms, embedding, head and the MTP projection stay high precision, as released
        for kept in ("model.layers.1.mlp.gate.weight", "model.embed_tokens.weight", "lm_head.weight",
                     f"model.layers.{args.num_hidden_layers}.eh_proj.weight"):
            assert f.get_tensor(kept).dtype == torch.float32
    assert n_fp8 > 20

    # within FP8 tolerance of the original: every weight to e4m3 precision (half-ulp 2^-4 relative,
    # subnormal spacing near zero), and a projection's output to a few percent
    for name, p in model.state_dict().items():
        q = loaded_sd[name]
        assert torch.allclose(q, p, rtol=2**-4 + 1e-6, atol=p.abs().max().item() * 2**-9 + 1e-12), name
    x = torch.randn(64, args.hidden_size)
    w, w8 = model.layers[0].mlp.gate_proj.weight, loaded.layers[0].mlp.gate_proj.weight
    assert not torch.equal(w, w8)
    rel = ((x @ w8.T - x @ w.T).norm() / (x @ w.T).norm()).item()
    assert rel < 0.04, rel


def test_fp8_scale_of_wrong_shape_is_a_clear_error(tmp_path):
    args = small_args(**FP8_ARGS)
    save_checkpoint(Transformer(args), args, tmp_path, fp8=True)
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "model.safetensors")
    name = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    sd[name] = torch.ones(5, 5)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(Exception, match="o_proj.*needs"):
        load_checkpoint(tmp_path)


def test_convert_fp8_to_bf16_and_back(tmp_path):
    args = small_args(**FP8_ARGS)
    model = randomize_(Transformer(args), seed=22).eval()
    save_checkpoint(model, args, tmp_path / "fp8", fp8=True, dtype=torch.bfloat16, max_shard_bytes=200_000)
    assert (tmp_path / "fp8" / "model.safetensors.index.json").exists()  # sharded
    assert cli(["model", "convert", str(tmp_path / "fp8"), str(tmp_path / "bf16"), "--to", "bf16"]) == 0
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in config
    from_fp8, _ = load_checkpoint(tmp_path / "fp8", dtype=torch.float32)
    from_bf16, _ = load_checkpoint(tmp_path / "bf16", dtype=torch.float32)
    for name, p in from_fp8.state_dict().items():
        # bf16 keeps 8 mantissa bits: the dequantised e4m3 values (4 significant bits) fit exactly
        # unless a block scale pushes them into bf16 rounding; allow one bf16 ulp
        assert torch.allclose(from_bf16.state_dict()[name], p, rtol=2**-8, atol=0), name
    assert cli(["model", "convert", str(tmp_path / "bf16"), str(tmp_path / "fp8b"), "--to", "fp8"]) == 0
    back, _ = load_checkpoint(tmp_path / "fp8b", dtype=torch.float32)
    # re-quantising values that are already e4m3 on the same block grid gives them back
    for name, p in from_fp8.state_dict().items():
        assert torch.allclose(back.state_dict()[name], p, rtol=2**-7, atol=0), name
