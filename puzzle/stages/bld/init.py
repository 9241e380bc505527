"""Child subblocks initialised from the parent, before any training (docs/method.md section 2).

Every initialiser maps a parent layer's weights (a state dict with keys relative to the layer, e.g.
"self_attn.k_proj.weight", "mlp.down_proj.weight") to the weights of one child subblock, under the same relative keys
that `PuzzleDecoderLayer` uses, so `puzzle.stages.bld` can load them into a layer built with
`PuzzleDecoderLayer.from_block`:

- fewer KV heads: each child KV head is the mean of the parent K/V heads its query heads used (`mean_pool_kv_heads`);
- linear attention: W_o @ W_v with the GQA heads expanded (each token attends only to itself), and the bias
  W_o @ b_v + b_o when the parent's projections have biases (Qwen2's v_proj);
- narrower FFN: keep the channels with the largest contribution, mean over calibration tokens of
  |a_c| * ||W_down[:, c]|| where a_c is the activation entering W_down (`ffn_channel_scores`);
- linear FFN: a least-squares fit of the FFN's output on its (normalised) input over calibration tokens, with
  W_down @ W_up (gate ignored) as the fallback when there are too few tokens;
- no-op: nothing.

Parent variants are not initialised at all: the library reuses the parent's own weights for them.
`init_attention` / `init_ffn` return `(state, method)`; `method` is recorded in the library index.
"""

from __future__ import annotations

import torch
from torch import Tensor

from puzzle.errors import ConfigError, PuzzleError
from puzzle.model.block_config import AttentionConfig, FFNConfig

ATTENTION_PREFIXES = ("input_layernorm.", "self_attn.")
FFN_PREFIXES = ("post_attention_layernorm.", "mlp.")


def subblock_prefixes(kind: str) -> tuple[str, ...]:
    """Relative state-dict prefixes of a layer's "attention" or "ffn" subblock."""
    if kind == "attention":
        return ATTENTION_PREFIXES
    if kind == "ffn":
        return FFN_PREFIXES
    raise ValueError(f"unknown subblock kind {kind!r}; expected 'attention' or 'ffn'")


def split_subblock(layer_state: dict[str, Tensor], kind: str) -> dict[str, Tensor]:
    """The part of a layer's state dict that belongs to one subblock."""
    prefixes = subblock_prefixes(kind)
    return {k: v for k, v in layer_state.items() if k.startswith(prefixes)}


# --------------------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------------------


def kv_head_of_query(num_attention_heads: int, num_kv_heads: int) -> Tensor:
    """For each query head, the index of the KV head it reads (GQA groups are contiguous)."""
    if num_kv_heads < 1 or num_attention_heads % num_kv_heads:
        raise ConfigError(f"{num_kv_heads} KV heads do not divide {num_attention_heads} attention heads")
    return torch.arange(num_attention_heads) // (num_attention_heads // num_kv_heads)


def mean_pool_kv_heads(
    weight: Tensor, num_attention_heads: int, num_kv_heads: int, new_kv_heads: int, head_dim: int
) -> Tensor:
    """Pool a K or V projection (weight [kv * head_dim, hidden] or bias [kv * head_dim]) to `new_kv_heads` heads.

    Child KV head j serves query heads [j * g, (j + 1) * g) with g = heads / new_kv_heads; it becomes the mean, over
    those query heads, of the parent KV head each of them used. When the parent's KV count is a multiple of the child's,
    that is exactly the mean of the parent KV heads in the group (GQA paper's mean pooling).
    """
    if new_kv_heads > num_kv_heads:
        raise ConfigError(f"cannot initialise {new_kv_heads} KV heads from a parent layer with {num_kv_heads}")
    parent_of_query = kv_head_of_query(num_attention_heads, num_kv_heads)
    child_of_query = kv_head_of_query(num_attention_heads, new_kv_heads)
    heads = weight.reshape(num_kv_heads, head_dim, *weight.shape[1:])
    pooled = torch.stack([heads[parent_of_query[child_of_query == j]].mean(dim=0) for j in range(new_kv_heads)])
    return pooled.reshape(new_kv_heads * head_dim, *weight.shape[1:]).contiguous()


def expand_kv_heads(weight: Tensor, num_attention_heads: int, num_kv_heads: int, head_dim: int) -> Tensor:
    """Repeat each KV head for every query head that reads it: [kv * hd, hidden] -> [heads * hd, hidden]."""
    heads = weight.reshape(num_kv_heads, head_dim, -1)
    return heads[kv_head_of_query(num_attention_heads, num_kv_heads)].reshape(num_attention_heads * head_dim, -1)


def linear_attention_weight(
    v_weight: Tensor, o_weight: Tensor, num_attention_heads: int, num_kv_heads: int, head_dim: int
) -> Tensor:
    """W_o @ W_v with GQA heads expanded: the attention's map when every token attends only to itself."""
    return o_weight @ expand_kv_heads(v_weight, num_attention_heads, num_kv_heads, head_dim)


def linear_attention_bias(
    v_bias: Tensor | None,
    o_weight: Tensor,
    o_bias: Tensor | None,
    num_attention_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> Tensor | None:
    """W_o @ b_v (GQA heads expanded) + b_o: what a token attending only to itself gets besides W_o W_v x.

    Attention weights sum to 1, so each head's output carries its KV head's value bias in full; None without biases.
    """
    if v_bias is None and o_bias is None:
        return None
    bias = torch.zeros(o_weight.shape[0], dtype=o_weight.dtype, device=o_weight.device)
    if v_bias is not None:
        expanded = expand_kv_heads(v_bias.reshape(-1, 1), num_attention_heads, num_kv_heads, head_dim).reshape(-1)
        bias = bias + o_weight @ expanded
    if o_bias is not None:
        bias = bias + o_bias
    return bias


def init_attention(
    parent_state: dict[str, Tensor], config, variant: AttentionConfig, parent_variant: AttentionConfig
) -> tuple[dict[str, Tensor] | None, str]:
    """Initial weights of attention subblock `variant` from a parent layer whose attention is `parent_variant`.

    `parent_state` is the parent layer's state dict (relative keys); `config` the parent's `PuzzleConfig`. Returns
    (state with "input_layernorm." / "self_attn." keys, init method), or (None, method) for parent and no-op variants,
    which hold no weights of their own in the library.
    """
    if variant == parent_variant:
        return None, "parent"
    if variant.no_op:
        return None, "no_op"
    heads, head_dim = config.num_attention_heads, config.head_dim
    if not parent_variant.is_gqa:
        raise PuzzleError(
            f"cannot initialise {variant.name} from a parent layer whose attention is {parent_variant.name}; "
            "start from a parent whose layers have GQA attention"
        )
    parent_kv = parent_variant.num_key_value_heads(heads)
    state = {"input_layernorm.weight": parent_state["input_layernorm.weight"].clone()}
    attn = {k[len("self_attn.") :]: v for k, v in parent_state.items() if k.startswith("self_attn.")}
    if variant.replace_with_linear:
        w = linear_attention_weight(attn["v_proj.weight"], attn["o_proj.weight"], heads, parent_kv, head_dim)
        state["self_attn.linear_attn.weight"] = w.contiguous()
        b = linear_attention_bias(
            attn.get("v_proj.bias"), attn["o_proj.weight"], attn.get("o_proj.bias"), heads, parent_kv, head_dim
        )
        if b is not None:  # PuzzleLinearAttention has a bias exactly when the parent's q/k/v or o_proj have one
            state["self_attn.linear_attn.bias"] = b.contiguous()
        return state, "linear_wo_wv"
    new_kv = variant.num_key_value_heads(heads)
    for name, tensor in attn.items():
        if name.startswith(("k_proj.", "v_proj.")):
            tensor = mean_pool_kv_heads(tensor, heads, parent_kv, new_kv, head_dim)
        state["self_attn." + name] = tensor.clone()
    return state, "kv_mean_pool"


# --------------------------------------------------------------------------------------------------------------------
# FFN
# --------------------------------------------------------------------------------------------------------------------


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama's RMSNorm (computed in float32), as applied before the FFN."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _act(config):
    from transformers.activations import ACT2FN

    return ACT2FN[config.hidden_act]


def swiglu_activations(mlp: dict[str, Tensor], x: Tensor, config) -> Tensor:
    """a = act(W_gate x) * (W_up x): the activation entering W_down, [tokens, intermediate]."""
    gate = torch.nn.functional.linear(x, mlp["gate_proj.weight"], mlp.get("gate_proj.bias"))
    up = torch.nn.functional.linear(x, mlp["up_proj.weight"], mlp.get("up_proj.bias"))
    return _act(config)(gate) * up


def ffn_channel_scores(mlp: dict[str, Tensor], x: Tensor, config, chunk: int = 4096) -> Tensor:
    """Channel contribution: mean over tokens of |a_c| * ||W_down[:, c]||_2, for normalised FFN inputs x [N, hidden]."""
    stats = FFNStats()
    stats.add(mlp, x, config, chunk=chunk)
    return stats.channel_scores(mlp).to(x.dtype)


class FFNStats:
    """Calibration statistics of one layer's FFN, summed batch by batch: memory set by the layer's shape, not by the
    number of calibration tokens.

    `abs_act` [intermediate] sums |a_c| (the activation entering W_down) for the channel scores; with `linear`, `gram`
    (x^T x) and `cross` (x^T y, y the parent FFN's output) [hidden, hidden] are the least-squares normal equations of
    a linear FFN. Sums are float64; inputs are the FFN's normalised inputs (after post_attention_layernorm).
    """

    def __init__(self, linear: bool = False) -> None:
        self.linear = linear
        self.tokens = 0
        self.abs_act: Tensor | None = None
        self.gram: Tensor | None = None
        self.cross: Tensor | None = None

    def add(self, mlp: dict[str, Tensor], x: Tensor, config, chunk: int = 4096) -> None:
        """Accumulate normalised FFN inputs x [N, hidden] (float32 weights `mlp`, keys relative to "mlp.")."""
        for rows in x.reshape(-1, x.shape[-1]).split(chunk):  # chunks keep [tokens, intermediate] small
            a = swiglu_activations(mlp, rows, config)
            part = a.abs().double().sum(dim=0)
            self.abs_act = part if self.abs_act is None else self.abs_act + part
            if self.linear:
                y = torch.nn.functional.linear(a, mlp["down_proj.weight"], mlp.get("down_proj.bias")).double()
                r64 = rows.double()
                gram, cross = r64.T @ r64, r64.T @ y
                self.gram = gram if self.gram is None else self.gram + gram
                self.cross = cross if self.cross is None else self.cross + cross
            self.tokens += rows.shape[0]

    def channel_scores(self, mlp: dict[str, Tensor]) -> Tensor:
        if self.abs_act is None:
            raise PuzzleError("FFN channel scores need calibration tokens; none were accumulated")
        return (self.abs_act / self.tokens).float() * mlp["down_proj.weight"].float().norm(dim=0)

    def lstsq(self, ridge: float = 1e-6) -> Tensor:
        """W minimising ||x W^T - y||^2 over the accumulated tokens: [out, in] float32."""
        if self.gram is None or self.cross is None:
            raise PuzzleError("a least-squares linear FFN needs calibration sums gathered with linear=True")
        return solve_normal_equations(self.gram, self.cross, ridge).float()

    @classmethod
    def from_inputs(cls, parent_state: dict[str, Tensor], config, ffn_inputs: Tensor, linear: bool = False):
        """Statistics of hidden states entering the FFN subblock (before its norm), [N, hidden] or [b, s, hidden]."""
        stats = cls(linear)
        stats.add_hidden(parent_state, config, ffn_inputs)
        return stats

    def add_hidden(self, parent_state: dict[str, Tensor], config, ffn_inputs: Tensor) -> None:
        """Accumulate hidden states entering the FFN subblock (normalised here with the layer's own norm)."""
        norm_w = parent_state["post_attention_layernorm.weight"].float()
        x = rms_norm(ffn_inputs.reshape(-1, ffn_inputs.shape[-1]).float(), norm_w, config.rms_norm_eps)
        self.add(_mlp32(parent_state), x, config)


def _mlp32(parent_state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k[len("mlp.") :]: v.float() for k, v in parent_state.items() if k.startswith("mlp.")}


def prune_ffn(mlp: dict[str, Tensor], scores: Tensor, new_size: int) -> dict[str, Tensor]:
    """Keep the `new_size` top-scoring channels (rows of W_gate, W_up; columns of W_down), in their original order."""
    keep = torch.topk(scores, new_size).indices.sort().values
    out = {}
    for name, tensor in mlp.items():
        if name.startswith(("gate_proj.", "up_proj.")):
            tensor = tensor[keep]
        elif name == "down_proj.weight":
            tensor = tensor[:, keep]
        out[name] = tensor.contiguous().clone()
    return out


def solve_normal_equations(gram: Tensor, cross: Tensor, ridge: float = 1e-6) -> Tensor:
    """W = ((x^T x + damp I)^-1 x^T y)^T in float64, damp a tiny ridge relative to the input scale (for rank-deficient
    inputs): [out, in]."""
    gram = gram.double()
    damp = ridge * gram.diagonal().mean().clamp_min(1e-12)
    gram = gram + damp * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, cross.double()).T.contiguous()


def linear_ffn_lstsq(x: Tensor, y: Tensor, ridge: float = 1e-6) -> Tensor:
    """W minimising ||x W^T - y||^2 (+ a tiny ridge, relative to the input scale, for rank-deficient inputs): [out, in].

    Solved through the normal equations in float64, which only needs the [in, in] and [in, out] Gram matrices.
    """
    x64, y64 = x.double(), y.double()
    return solve_normal_equations(x64.T @ x64, x64.T @ y64, ridge).to(x.dtype)


def swiglu_output(mlp: dict[str, Tensor], x: Tensor, config) -> Tensor:
    """The parent FFN's output for normalised inputs x."""
    a = swiglu_activations(mlp, x, config)
    return torch.nn.functional.linear(a, mlp["down_proj.weight"], mlp.get("down_proj.bias"))


def init_ffn(
    parent_state: dict[str, Tensor],
    config,
    variant: FFNConfig,
    parent_variant: FFNConfig,
    ffn_inputs: Tensor | FFNStats | None = None,
    min_lstsq_ratio: float = 2.0,
) -> tuple[dict[str, Tensor] | None, str]:
    """Initial weights of FFN subblock `variant` from a parent layer whose FFN is `parent_variant`.

    `ffn_inputs` are calibration hidden states entering the FFN subblock (before post_attention_layernorm), [N, hidden]
    or [b, s, hidden], or their `FFNStats` summed batch by batch. Channel scores need them; the least-squares linear
    FFN is used when there are at least `min_lstsq_ratio` x hidden tokens, otherwise W_down @ W_up. Returns (state
    with "post_attention_layernorm." / "mlp." keys, init method), or (None, method) for parent and no-op variants.
    """
    if variant == parent_variant:
        return None, "parent"
    if variant.no_op:
        return None, "no_op"
    if not parent_variant.is_mlp:
        raise PuzzleError(
            f"cannot initialise {variant.name} from a parent layer whose FFN is {parent_variant.name}; "
            "start from a parent whose layers have SwiGLU FFNs"
        )
    state = {"post_attention_layernorm.weight": parent_state["post_attention_layernorm.weight"].clone()}
    mlp = {k[len("mlp.") :]: v for k, v in parent_state.items() if k.startswith("mlp.")}
    stats = ffn_inputs
    if isinstance(ffn_inputs, Tensor):  # scores and fits in float32 whatever the parent's dtype
        stats = FFNStats.from_inputs(parent_state, config, ffn_inputs, linear=variant.replace_with_linear)
    if variant.replace_with_linear:
        if stats is not None and stats.gram is not None and stats.tokens >= min_lstsq_ratio * stats.gram.shape[0]:
            w, method = stats.lstsq(), "lstsq"
        else:
            w, method = mlp["down_proj.weight"].float() @ mlp["up_proj.weight"].float(), "wdown_wup"
        state["mlp.linear_mlp.weight"] = w.to(mlp["down_proj.weight"].dtype).contiguous()
        return state, method
    if variant.intermediate_size > parent_variant.intermediate_size:
        raise ConfigError(
            f"{variant.name} is wider than the parent layer's FFN ({parent_variant.intermediate_size}); "
            "FFN variants can only shrink the parent"
        )
    if stats is None:
        raise PuzzleError(f"{variant.name} needs calibration tokens for its channel scores; pass calibration data")
    scores = stats.channel_scores(mlp)
    state.update({"mlp." + k: v for k, v in prune_ffn(mlp, scores, variant.intermediate_size).items()})
    return state, "channel_contribution"
