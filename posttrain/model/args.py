"""ModelArgs: the DeepSeek-V3 hyper-parameters, read from and written to an HF `config.json`.

Field names are the Hugging Face `deepseek_v3` config names, so a released `config.json`
maps onto this dataclass one to one and back. Reading is strict: an unknown key, a value of
the wrong type, or a combination the architecture cannot run raises `ConfigError` naming the
key, instead of silently building a different model than the checkpoint describes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that does not describe a DeepSeek-V3 model this core can build."""


@dataclass
class YarnScaling:
    """YaRN context extension (`rope_scaling` with type "yarn").

    factor: context extension ratio (40 for the release: 4k -> 160k).
    beta_fast / beta_slow: rotation counts bounding the ramp between extrapolated and
        interpolated frequencies.
    mscale / mscale_all_dim: attention temperature terms; the ratio of the two scales cos/sin,
        and `mscale_all_dim` squared multiplies the softmax scale (folded in once, in attention).
    attention_factor: explicit cos/sin scale; when None it is derived from the mscales.
    original_max_position_embeddings: the pre-extension context length.
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"type": "yarn", **dataclasses.asdict(self)}
        return {k: v for k, v in d.items() if v is not None}


@dataclass
class ModelArgs:
    """DeepSeek-V3 architecture, field by field (defaults: a small model, not the release).

    Dimensions
        vocab_size: embedding rows and LM-head outputs.
        hidden_size: model width D.
        intermediate_size: FFN width of the first `first_k_dense_replace` dense layers.
        moe_intermediate_size: FFN width of one routed (and one shared) expert.
        num_hidden_layers: transformer blocks in the main model (MTP blocks not counted).
        num_attention_heads: attention heads H (MLA has no grouped KV heads).
    Multi-head latent attention (MLA)
        q_lora_rank: rank of the query down-projection, or None for a full q_proj.
        kv_lora_rank: width of the compressed KV latent that the decode cache stores.
        qk_nope_head_dim / qk_rope_head_dim: per-head query/key widths without / with RoPE;
            the rope key is shared by all heads.
        v_head_dim: per-head value width.
    DeepSeekMoE
        n_routed_experts / n_shared_experts: routed experts E and always-on shared experts.
        num_experts_per_tok: routed experts per token (top-k).
        n_group / topk_group: experts split into n_group groups; tokens may only use
            experts of their best topk_group groups (node-limited routing).
        routed_scaling_factor: multiplies the routed gate weights.
        norm_topk_prob: normalise the top-k affinities to sum to one.
        scoring_func / topk_method: "sigmoid" / "noaux_tc" (the V3 router; the only ones built).
        first_k_dense_replace: the first k layers use a dense FFN instead of MoE.
        moe_layer_freq: among later layers, every moe_layer_freq-th is MoE.
        aux_loss_alpha: weight alpha of the complementary sequence-wise balance loss.
        seq_aux: the balance loss is computed per sequence (True in the release).
    Multi-token prediction
        num_nextn_predict_layers: MTP depth D (0 = none); their weights are layers
            num_hidden_layers .. num_hidden_layers + D - 1 in the checkpoint.
    Positions and normalisation
        rope_theta: RoPE base.
        rope_scaling: YaRN parameters or None.
        max_position_embeddings: longest context the model is configured for.
        rms_norm_eps: RMSNorm epsilon.
        tie_word_embeddings: share the embedding matrix with the LM head.
    Tokens and init
        bos_token_id / eos_token_id / pad_token_id: as the tokenizer defines them.
        initializer_range: std of the normal init of fresh weights.
    """

    vocab_size: int = 1024
    hidden_size: int = 256
    intermediate_size: int = 512
    moe_intermediate_size: int = 128
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    q_lora_rank: int | None = 128
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 64
    v_head_dim: int = 32
    n_routed_experts: int = 16
    n_shared_experts: int = 1
    num_experts_per_tok: int = 4
    n_group: int = 4
    topk_group: int = 2
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    aux_loss_alpha: float = 0.0001
    seq_aux: bool = True
    num_nextn_predict_layers: int = 1
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    initializer_range: float = 0.02

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Which blocks are MoE: after the first k dense ones, every moe_layer_freq-th."""
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    # --------------------------------------------------------------- validation
    def validate(self) -> "ModelArgs":
        """Raise ConfigError on any combination the architecture cannot run."""
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
            "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim",
            "v_head_dim", "n_group", "topk_group", "moe_layer_freq", "max_position_embeddings",
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("qk_nope_head_dim", "n_routed_experts", "n_shared_experts",
                     "first_k_dense_replace", "num_nextn_predict_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"q_lora_rank must be a positive int or null, got {self.q_lora_rank}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.scoring_func != "sigmoid":
            raise ConfigError(
                f"scoring_func={self.scoring_func!r}: only the DeepSeek-V3 'sigmoid' router is built "
                "(softmax scoring is DeepSeek-V2's)"
            )
        if self.topk_method != "noaux_tc":
            raise ConfigError(
                f"topk_method={self.topk_method!r}: only 'noaux_tc' (group-limited, bias-corrected) is built"
            )
        if self.n_routed_experts:
            E, G = self.n_routed_experts, self.n_group
            if E % G:
                raise ConfigError(f"n_routed_experts={E} is not divisible by n_group={G}")
            if E // G < 2 and G > 1:
                raise ConfigError(
                    f"n_routed_experts/n_group={E // G}: a group needs at least 2 experts "
                    "(its score is the sum of its top-2 affinities)"
                )
            if self.topk_group > G:
                raise ConfigError(f"topk_group={self.topk_group} > n_group={G}")
            reachable = self.topk_group * (E // G)
            if not 0 < self.num_experts_per_tok <= reachable:
                raise ConfigError(
                    f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..{reachable} "
                    f"(topk_group * experts per group)"
                )
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ConfigError(
                f"first_k_dense_replace={self.first_k_dense_replace} > num_hidden_layers={self.num_hidden_layers}"
            )
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            if rs.factor < 1:
                raise ConfigError(f"rope_scaling.factor must be >= 1, got {rs.factor}")
            if rs.original_max_position_embeddings <= 0:
                raise ConfigError("rope_scaling.original_max_position_embeddings must be > 0")
            if rs.beta_fast <= rs.beta_slow:
                raise ConfigError(
                    f"rope_scaling.beta_fast={rs.beta_fast} must exceed beta_slow={rs.beta_slow}"
                )
        if self.rms_norm_eps <= 0 or not math.isfinite(self.rms_norm_eps):
            raise ConfigError(f"rms_norm_eps must be a positive finite float, got {self.rms_norm_eps}")
        return self

    # ------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> "ModelArgs":
        """Build from the dict of an HF `config.json` (release format or transformers 5's)."""
        return _from_hf(cls, dict(config))

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelArgs":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_hf_config(config)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_hf_config(self, torch_dtype: str = "bfloat16") -> dict[str, Any]:
        """The release-format config.json dict that transformers and vLLM both read."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["rope_scaling"] = self.rope_scaling.to_dict() if self.rope_scaling else None
        d.update(
            architectures=["DeepseekV3ForCausalLM"],
            model_type="deepseek_v3",
            num_key_value_heads=self.num_attention_heads,
            hidden_act="silu",
            attention_bias=False,
            attention_dropout=0.0,
            ep_size=1,
            torch_dtype=torch_dtype,
        )
        return dict(sorted(d.items()))

    def save_json(self, path: str | Path, torch_dtype: str = "bfloat16") -> None:
        Path(path).write_text(json.dumps(self.to_hf_config(torch_dtype), indent=2) + "\n")


# Keys an HF config.json may carry that do not change the architecture we build. Each is
# either checked for consistency below or is bookkeeping (dtype, versions, generation flags).
_BOOKKEEPING_KEYS = {
    "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "pretraining_tp", "ep_size", "output_router_logits", "quantization_config",
    "id2label", "label2id", "num_labels", "problem_type", "return_dict", "output_hidden_states",
    "output_attentions", "tie_encoder_decoder", "is_encoder_decoder", "chunk_size_feed_forward",
    "torchscript", "task_specific_params", "finetuning_task", "tokenizer_class", "prefix",
    "sep_token_id", "decoder_start_token_id", "add_cross_attention", "cross_attention_hidden_size",
    "is_decoder", "pruned_heads", "tf_legacy_loss", "use_bfloat16", "name_or_path",
}


def _from_hf(cls: type[ModelArgs], cfg: dict[str, Any]) -> ModelArgs:
    model_type = cfg.pop("model_type", None)
    if model_type != "deepseek_v3":
        raise ConfigError(f"model_type must be 'deepseek_v3', got {model_type!r}")

    # Architecture-neutral fields that must agree with what this core implements.
    def expect(key: str, ok, why: str) -> None:
        if key in cfg:
            value = cfg.pop(key)
            if not ok(value):
                raise ConfigError(f"{key}={value!r}: {why}")

    heads = cfg.get("num_attention_heads")
    expect("num_key_value_heads", lambda v: v is None or v == heads,
           "MLA has one latent KV; num_key_value_heads must equal num_attention_heads")
    expect("hidden_act", lambda v: v == "silu", "only SiLU-gated FFNs are built")
    expect("attention_bias", lambda v: not v, "the release has no attention biases; they are not built")
    expect("attention_dropout", lambda v: not v, "attention dropout is not supported")
    expect("rope_interleave", lambda v: v is None or bool(v),
           "only the interleaved-pair RoPE layout of the released weights is built")
    rope_dim = cfg.get("qk_rope_head_dim")
    expect("head_dim", lambda v: v is None or v == rope_dim, "must equal qk_rope_head_dim")
    qk = (cfg.get("qk_nope_head_dim") or 0) + (rope_dim or 0)
    expect("qk_head_dim", lambda v: v is None or v == qk, "must equal qk_nope_head_dim + qk_rope_head_dim")
    # transformers 5 calls the MTP depth num_mtp_layers; keep one name.
    if "num_mtp_layers" in cfg:
        n = cfg.pop("num_mtp_layers")
        if cfg.setdefault("num_nextn_predict_layers", n) != n:
            raise ConfigError("num_mtp_layers and num_nextn_predict_layers disagree")

    _read_rope(cfg)

    for key in list(cfg):
        if key in _BOOKKEEPING_KEYS or key.startswith("_"):
            cfg.pop(key)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown config field(s) {unknown}; a deepseek_v3 config.json has "
            f"{sorted(set(names) | {'num_key_value_heads', 'hidden_act'})}"
        )
    kwargs = {k: _check_type(k, v, names[k]) for k, v in cfg.items()}
    return cls(**kwargs).validate()


def _read_rope(cfg: dict[str, Any]) -> None:
    """Normalise `rope_scaling` + `rope_theta` (release) and `rope_parameters` (transformers 5)."""
    params = cfg.pop("rope_parameters", None)
    scaling = cfg.pop("rope_scaling", None)
    if params is not None:
        if scaling is not None and scaling != params:
            raise ConfigError("both rope_scaling and rope_parameters are set and they differ")
        params = dict(params)
        if "rope_theta" in params:
            theta = params.pop("rope_theta")
            if cfg.setdefault("rope_theta", theta) != theta:
                raise ConfigError("rope_theta and rope_parameters.rope_theta disagree")
        scaling = params
    if not scaling:
        cfg["rope_scaling"] = None
        return
    scaling = dict(scaling)
    kind = scaling.pop("type", None) or scaling.get("rope_type")
    scaling.pop("rope_type", None)
    if kind in ("default", None) and "factor" not in scaling:
        cfg["rope_scaling"] = None
        return
    if kind != "yarn":
        raise ConfigError(f"rope_scaling type {kind!r} is not supported (only 'yarn')")
    allowed = {f.name for f in dataclasses.fields(YarnScaling)}
    if scaling.pop("truncate", True) is not True:
        raise ConfigError("rope_scaling.truncate=false is not supported (the release truncates)")
    unknown = sorted(set(scaling) - allowed)
    if unknown:
        raise ConfigError(f"unknown rope_scaling field(s) {unknown}; yarn takes {sorted(allowed)}")
    if "factor" not in scaling or "original_max_position_embeddings" not in scaling:
        raise ConfigError("rope_scaling yarn needs 'factor' and 'original_max_position_embeddings'")
    for k in ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
        if scaling.get(k) is not None:
            if isinstance(scaling[k], bool) or not isinstance(scaling[k], (int, float)):
                raise ConfigError(f"rope_scaling.{k} must be a number, got {scaling[k]!r}")
            scaling[k] = float(scaling[k])
    omp = scaling["original_max_position_embeddings"]
    if isinstance(omp, bool) or not isinstance(omp, int):
        raise ConfigError(f"rope_scaling.original_max_position_embeddings must be an int, got {omp!r}")
    cfg["rope_scaling"] = YarnScaling(**scaling)


def _check_type(name: str, value: Any, f: dataclasses.Field) -> Any:
    """Coerce ints to floats where a float is expected; reject everything else that mismatches."""
    if name == "rope_scaling":
        return value
    annotation = str(f.type)
    optional = "None" in annotation
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} must not be null")
    if annotation.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true/false, got {value!r}")
        return value
    if annotation.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if annotation.startswith("int | list"):
        ok = isinstance(value, int) and not isinstance(value, bool) or (
            isinstance(value, list) and all(isinstance(v, int) for v in value))
        if not ok:
            raise ConfigError(f"{name} must be an int or a list of ints, got {value!r}")
        return value
    if annotation.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if annotation.startswith("str"):
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    return value
