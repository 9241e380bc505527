"""The heterogeneous Llama-family decoder Puzzle searches over: every layer picks its own attention and FFN.

Per layer (`PuzzleConfig.block_configs[i]`): attention is GQA with any KV-head count dividing the heads, `linear` (one
hidden x hidden matrix, each token attends only to itself) or `no_op`; the FFN is SwiGLU of any width, `linear` or
`no_op`. Parameter names follow HF Llama and vLLM's `DeciLMForCausalLM` (nemotron_nas.py), so a Llama state_dict loads
directly and vLLM reads the exported weights. It follows transformers 5's Llama closely (decoder layers return a Tensor,
attention through `ALL_ATTENTION_FUNCTIONS`, outputs recorded with `_can_record_outputs`).

KV cache: only GQA layers hold one. They use *compact* cache slots (the k-th GQA layer writes slot k, as vLLM's
`kv_cache_index` does), so slot 0 is always a real attention layer and `Cache.get_seq_length()` counts the tokens seen,
even when layer 0's attention is a no-op. transformers 5.24 renamed the cache argument and output field from
`past_key_values` to `cache` (and `generate()` passes it as `cache=`); the forwards here accept either name, whichever
transformers 5.x calls them, and speak the installed version's name to transformers' own helpers.

This file is copied next to every export and imported there by transformers' remote-code loader, where `puzzle` is not
importable: it may only import torch, transformers, the standard library and its siblings (relatively).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .block_config import AttentionConfig, BlockConfig, FFNConfig
from .configuration_puzzle import PuzzleConfig

# The installed transformers' name for the KV cache: "cache" from 5.24 on, "past_key_values" before. It names the
# output field (`generate()` reads the cache back from it) and the layer kwarg that GradientCheckpointingLayer drops
# under checkpointing. The old name still works in 5.24 but is deprecated, so transformers is spoken to in its own.
CACHE_NAME = "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"
# create_causal_mask's own parameter name, looked up separately in case it was renamed in another release.
_MASK_CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def resolve_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The KV cache given under either name (`cache` from 5.24's `generate()` on, `past_key_values` before)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("got two different KV caches: pass it as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def cache_of(outputs) -> Cache | None:
    """The KV cache a forward or `generate()` output holds, under the installed transformers' field name."""
    return getattr(outputs, CACHE_NAME, None)


class PuzzleRMSNorm(nn.Module):
    """RMSNorm computed in fp32, as Llama's."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class PuzzleRotaryEmbedding(nn.Module):
    """RoPE as the parent has it (default, llama3, linear, dynamic, yarn, ... via transformers' ROPE_INIT_FUNCTIONS)."""

    def __init__(self, config: PuzzleConfig) -> None:
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: PuzzleConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


class PuzzleAttention(nn.Module):
    """GQA with this layer's own KV-head count (`num_attention_heads // n_heads_in_group`)."""

    def __init__(self, config: PuzzleConfig, attention: AttentionConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = attention.num_key_value_heads(config.num_attention_heads)
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        qkv_bias, o_bias = config.qkv_bias, config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=o_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        cache_index: int | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if past_key_values is not None:
            slot = self.layer_idx if cache_index is None else cache_index
            key_states, value_states = past_key_values.update(key_states, value_states, slot)

        implementation = self.config._attn_implementation
        if attention_mask is None and implementation in (None, "eager"):
            # No mask means "causal over these tokens": eager would attend everywhere, so take SDPA's is_causal path.
            attention_interface: Callable = sdpa_attention_forward
        else:
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        kwargs.pop("position_ids", None)
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class PuzzleLinearAttention(nn.Module):
    """`replace_with_linear` attention: one hidden x hidden matrix; each token only attends to itself (no KV cache).

    With biased projections (Qwen2's v_proj, or an o_proj bias) the attention of a token to itself adds a constant,
    o_proj(v_proj's bias) + o_proj's bias, so the linear map carries a bias too.
    """

    def __init__(self, config: PuzzleConfig) -> None:
        super().__init__()
        bias = bool(config.qkv_bias or config.attention_bias)
        self.linear_attn = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return self.linear_attn(hidden_states), None


class PuzzleMLP(nn.Module):
    """SwiGLU FFN of this layer's own width."""

    def __init__(self, config: PuzzleConfig, intermediate_size: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PuzzleLinearMLP(nn.Module):
    """`replace_with_linear` FFN: one hidden x hidden matrix."""

    def __init__(self, config: PuzzleConfig) -> None:
        super().__init__()
        self.linear_mlp = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_mlp(x)


def build_attention(config: PuzzleConfig, attention: AttentionConfig, layer_idx: int) -> nn.Module | None:
    """The attention subblock for `attention` (None for no-op); its norm is the layer's `input_layernorm`."""
    if attention.no_op:
        return None
    if attention.replace_with_linear:
        return PuzzleLinearAttention(config)
    return PuzzleAttention(config, attention, layer_idx)


def build_ffn(config: PuzzleConfig, ffn: FFNConfig) -> nn.Module | None:
    """The FFN subblock for `ffn` (None for no-op); its norm is the layer's `post_attention_layernorm`."""
    if ffn.no_op:
        return None
    if ffn.replace_with_linear:
        return PuzzleLinearMLP(config)
    return PuzzleMLP(config, ffn.intermediate_size)


class PuzzleDecoderLayer(GradientCheckpointingLayer):
    """One child layer: h + attention_delta(h), then + ffn_delta. No-op subblocks have no modules (and no norm)."""

    def __init__(self, config: PuzzleConfig, layer_idx: int, block: BlockConfig | None = None) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.layer_idx = layer_idx
        self.block = block if block is not None else config.block_config(layer_idx)
        self.self_attn = build_attention(config, self.block.attention, layer_idx)
        self.input_layernorm = (
            PuzzleRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if self.self_attn is not None else None
        )
        self.mlp = build_ffn(config, self.block.ffn)
        self.post_attention_layernorm = (
            PuzzleRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if self.mlp is not None else None
        )

    @classmethod
    def from_block(cls, config: PuzzleConfig, block: BlockConfig, layer_idx: int) -> PuzzleDecoderLayer:
        """A layer for `block` outside a full model (library variants), sharing the model's `config`."""
        return cls(config, layer_idx, block=block)

    @property
    def has_kv_cache(self) -> bool:
        return isinstance(self.self_attn, PuzzleAttention)

    def attention_delta(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        cache_position: torch.Tensor | None = None,
        cache_index: int | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor | None:
        """What the attention subblock (norm included) adds to the residual; None for a no-op.

        With `attention_mask=None` the attention is causal over the given tokens (no earlier cached tokens).
        The KV cache comes as `past_key_values` or `cache`; `cache_index` is the layer's slot in it (the model passes
        compact slots; default `layer_idx`). `cache_position` is accepted for API symmetry; positions come in through
        `position_embeddings`.
        """
        if self.self_attn is None:
            return None
        normed = self.input_layernorm(hidden_states)
        delta, _ = self.self_attn(
            normed,
            position_embeddings,
            attention_mask=attention_mask,
            past_key_values=resolve_cache(cache, past_key_values),
            cache_index=cache_index,
            **kwargs,
        )
        return delta

    def ffn_delta(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """What the FFN subblock (norm included) adds to the residual; None for a no-op."""
        if self.mlp is None:
            return None
        return self.mlp(self.post_attention_layernorm(hidden_states))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        cache_position: torch.Tensor | None = None,
        cache_index: int | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        past_key_values = resolve_cache(cache, past_key_values)
        delta = self.attention_delta(
            hidden_states, position_embeddings, attention_mask, past_key_values, cache_position, cache_index, **kwargs
        )
        if delta is not None:
            hidden_states = hidden_states + delta
        delta = self.ffn_delta(hidden_states)
        if delta is not None:
            hidden_states = hidden_states + delta
        return hidden_states


class PuzzlePreTrainedModel(PreTrainedModel):
    config: PuzzleConfig
    config_class = PuzzleConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PuzzleDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = False
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": PuzzleDecoderLayer, "attentions": PuzzleAttention}


class PuzzleModel(PuzzlePreTrainedModel):
    """Embeddings, the heterogeneous layers and the final norm."""

    def __init__(self, config: PuzzleConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([PuzzleDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = PuzzleRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = PuzzleRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        # A cache that arrived under the name this version does not use would otherwise sink into **kwargs while a
        # fresh one is made here, and every decoding step would see only its own token.
        past_key_values = resolve_cache(cache, past_key_values)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            if cache_position is not None:
                position_ids = cache_position.unsqueeze(0)
            else:
                # Compact cache slots: slot 0 is the first GQA layer, so this counts the tokens seen so far.
                past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
                position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
                position_ids = position_ids.unsqueeze(0)
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{_MASK_CACHE_ARG: past_key_values},
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        cache_index = 0
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                position_embeddings,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache_index=cache_index,
                **{CACHE_NAME: past_key_values},
                **kwargs,
            )
            cache_index += int(decoder_layer.has_kv_cache)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_NAME: past_key_values})


class PuzzleForCausalLM(PuzzlePreTrainedModel, GenerationMixin):
    """The child (or the all-parent model) with its LM head; works with `generate()` and a KV cache."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PuzzleConfig) -> None:
        super().__init__(config)
        self.model = PuzzleModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """The KV cache is accepted as `past_key_values` or `cache` (what `generate()` passes from 5.24 on)."""
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=resolve_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_NAME: cache_of(outputs)},
        )


# `save_pretrained` then writes these files and an `auto_map` next to the weights, so an export loads with
# `trust_remote_code=True` where puzzle is not installed.
PuzzleConfig.register_for_auto_class()
PuzzleForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def register_auto_classes() -> None:
    """Map model_type "nemotron-nas" to these classes in AutoConfig / AutoModelForCausalLM (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(PuzzleConfig.model_type, PuzzleConfig, exist_ok=True)
    AutoModelForCausalLM.register(PuzzleConfig, PuzzleForCausalLM, exist_ok=True)


# Every puzzle code path that loads a model imports this module first, so registering here covers them all
# (`import puzzle` itself stays free of torch). Not in an export's shipped copy, which transformers imports
# as remote code under another name: that must not re-map "nemotron-nas" in the user's process.
if __name__ == "puzzle.model.modeling_puzzle":
    register_auto_classes()


__all__ = [
    "CACHE_NAME",
    "PuzzleAttention",
    "PuzzleConfig",
    "PuzzleDecoderLayer",
    "PuzzleForCausalLM",
    "PuzzleLinearAttention",
    "PuzzleLinearMLP",
    "PuzzleMLP",
    "PuzzleModel",
    "PuzzlePreTrainedModel",
    "build_attention",
    "build_ffn",
    "cache_of",
    "register_auto_classes",
    "resolve_cache",
]
