"""ModelArgs: the DeepSeek-V3 hyper-parameters, and presets loaded from configs/models/*.yaml.

Field names follow DeepSeek-V3's reference `inference/model.py`; `model.hf` maps them to the
names of transformers' DeepseekV3Config. The last group (execution choices: attention padding, the
MoE decoding path) changes speed, not results, and is not exported.

Test: `pytest tests/model/test_model_args.py`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Literal, Optional

import pydantic
import yaml
from pydantic import ConfigDict, Field

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"

Pos = Annotated[int, Field(ge=1)]
NonNeg = Annotated[int, Field(ge=0)]


@dataclasses.dataclass
class ModelArgs:
    __pydantic_config__ = ConfigDict(extra="forbid", allow_inf_nan=False)

    # sizes
    vocab: Pos = 4096  # vocabulary size (at least the tokenizer's)
    dim: Pos = 128  # hidden size D
    inter_dim: Pos = 384  # dense FFN hidden size (first n_dense_layers)
    moe_inter_dim: Pos = 64  # hidden size of each routed / shared expert
    n_layers: Pos = 3  # transformer blocks (first n_dense_layers dense, the rest MoE)
    n_dense_layers: NonNeg = 1  # leading blocks with a dense FFN instead of the MoE
    n_heads: Pos = 4  # attention heads
    max_seq_len: Pos = 512  # longest sequence (RoPE table, caches)
    norm_eps: Annotated[float, Field(gt=0)] = 1e-6  # RMSNorm epsilon
    # MLA (DeepSeek-V2 section 2.1): low-rank q and kv, decoupled RoPE key
    q_lora_rank: Optional[NonNeg] = 0  # 0 / None: no query compression (V2-Lite)
    kv_lora_rank: Pos = 64  # MLA: compressed key/value latent size (the cache holds this per token)
    qk_nope_head_dim: Pos = 32  # MLA: per-head query/key size without RoPE
    qk_rope_head_dim: Annotated[int, Field(ge=2, multiple_of=2)] = 16  # MLA: per-head decoupled RoPE size (one shared key)
    v_head_dim: Pos = 32  # MLA: per-head value size
    # RoPE with YaRN context extension (rope_factor 1 = plain RoPE)
    rope_theta: Annotated[float, Field(gt=0)] = 10000.0
    rope_factor: Annotated[float, Field(ge=1)] = 1.0  # YaRN context extension factor (1: none)
    original_seq_len: Pos = 4096  # YaRN: the pretraining context length
    beta_fast: Annotated[float, Field(gt=0)] = 32.0  # YaRN ramp: fast boundary
    beta_slow: Annotated[float, Field(gt=0)] = 1.0  # YaRN ramp: slow boundary
    mscale: Annotated[float, Field(ge=0)] = 1.0  # YaRN attention scale factor
    # DeepSeekMoE (V3 section 2.1.2)
    n_routed_experts: Pos = 8
    n_shared_experts: NonNeg = 1  # experts every token uses
    n_activated_experts: Pos = 2  # routed experts per token (top-k)
    n_expert_groups: Pos = 2  # expert groups for group-limited routing
    n_limited_groups: Pos = 1  # groups each token may route to
    score_func: Literal["sigmoid", "softmax"] = "sigmoid"  # gate scores: sigmoid (V3) or softmax (V2)
    route_scale: Annotated[float, Field(gt=0)] = 1.0  # scale of the routed experts' weights
    norm_topk: bool = True  # normalise the top-k gate weights to sum 1
    # auxiliary-loss-free balancing (V3 section 2.1.2) and the small sequence-wise loss
    bias_update_speed: Annotated[float, Field(ge=0)] = 1e-3
    seq_aux_loss_alpha: Annotated[float, Field(ge=0)] = 0.0  # weight of the sequence-wise balance loss (V3: very small)
    # multi-token prediction (V3 section 2.2)
    mtp_depth: NonNeg = 1
    mtp_loss_weight: Annotated[float, Field(ge=0)] = 0.3  # weight of the multi-token-prediction loss (lambda)
    # initialisation
    init_std: Annotated[float, Field(gt=0)] = 0.02  # standard deviation of the initial weights
    tie_embeddings: bool = False  # share the embedding and output head weights
    # execution choices: the same results up to rounding, only speed differs; not architecture, so
    # model.hf leaves them out of config.json. Each has a benchmark timing both settings.
    # MLA pads v to the q/k head dim, so SDPA can take its fused kernels (benchmarks/model_attention.py).
    attn_pad_v: bool = True
    # On CPU, an MoE batch whose (token, expert) pairs' gathered weights take at most this many bytes
    # runs them as batched matmuls instead of sorting them by expert (decoding sizes; 0 = always
    # sort; benchmarks/model_dispatch.py --decode).
    moe_pair_path_bytes: NonNeg = 2 << 20

    def __post_init__(self):
        if self.q_lora_rank is None:
            self.q_lora_rank = 0
        if self.n_dense_layers > self.n_layers:
            raise ValueError(f"n_dense_layers ({self.n_dense_layers}) must not exceed n_layers ({self.n_layers})")
        if self.n_routed_experts % self.n_expert_groups:
            raise ValueError(f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_expert_groups ({self.n_expert_groups})")
        if self.n_limited_groups > self.n_expert_groups:
            raise ValueError(f"n_limited_groups ({self.n_limited_groups}) must not exceed n_expert_groups ({self.n_expert_groups})")
        per_group = self.n_routed_experts // self.n_expert_groups
        if self.n_activated_experts > self.n_limited_groups * per_group:
            raise ValueError(
                f"n_activated_experts ({self.n_activated_experts}) exceeds the experts in n_limited_groups "
                f"({self.n_limited_groups} groups x {per_group})"
            )
        if self.n_expert_groups > 1 and per_group < 2:
            raise ValueError("each expert group needs at least 2 experts (group score = sum of its top-2)")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers


def load_model_args(name_or_path: str | Path, **overrides) -> ModelArgs:
    """A preset name from configs/models/ (e.g. "tiny") or a YAML path, with keyword overrides."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
            raise ValueError(f"unknown model preset {str(name_or_path)!r} (known: {known})")
    if not path.is_file():
        raise FileNotFoundError(f"model config {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    data.update(overrides)
    try:
        return pydantic.TypeAdapter(ModelArgs).validate_python(data)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(model)"
        raise ValueError(f"{path}: key '{key}': {err['msg']}") from None
