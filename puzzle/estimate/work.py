"""What each stage of a job computes, counted from the parent's config, the search space, the token budgets and the
target, before anything runs: FLOPs, bytes and kernel launches of the passes it makes, the workers it runs them on,
and the memory those hold (weights, optimizer state, activations, KV cache, the object store).

A stage is a list of `Lane`s that run at the same time (BLD's trainers, scoring's tasks) plus the driver's own
passes; each lane is a list of `Pass`es run one after another. `puzzle.estimate.model` turns passes into seconds
with a device's fitted rates. Counting follows the code of each stage (named in each builder's docstring), so a
change there is a change here.

FLOPs: a matrix product of a [rows, k] input with a [k, n] weight is 2 * rows * k * n; a decoder layer's forward
is 2 * (its matrix parameters) per token plus causal attention, 2 * heads * head_dim * (L + 1) per token over a
sequence of L (QK^T and AV over (L + 1) / 2 keys on average); the LM head 2 * hidden * vocab per token. A training
pass is the forward and a backward of twice its FLOPs for the trained weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from puzzle.model.block_config import AttentionConfig, BlockConfig, FFNConfig

ADAM_BYTES = 16
"""Bytes per trained parameter: fp32 master weight, gradient and AdamW's two moments."""
STEP_BYTES = 32
"""Bytes an AdamW step moves per trained parameter: reads weight, gradient and both moments, writes weight and both
moments, and the backward's gradient write (fp32)."""
KERNELS_PER_SUBBLOCK = 8
"""Kernel launches of one attention or FFN subblock in a decode step (norm, projections, rotary, attention, adds)."""
NOOP = BlockConfig(AttentionConfig(no_op=True), FFNConfig(no_op=True))


@dataclass(frozen=True)
class Pass:
    """A computation repeated `calls` times: a forward ("forward"), forward + backward ("train"), a decode step
    ("decode"; "decode_cold" when timed from a cold cache), softmax/KL over the vocabulary ("vocab", flops =
    elements), random initialisation ("init", flops = parameters), a write to disk ("disk", flops = bytes) or bytes
    moved through memory ("memory", flops = bytes)."""

    kind: str
    calls: float
    flops: float
    rows: int = 1
    width: int = 1
    trained: float = 1.0
    bytes: float = 0.0
    kernels: int = 0


@dataclass
class Lane:
    """Passes one worker runs in order, with `threads` CPU threads (or one GPU)."""

    passes: list[Pass] = field(default_factory=list)
    threads: int = 1

    def add(self, *passes: Pass) -> Lane:
        self.passes.extend(p for p in passes if p.calls > 0)
        return self


@dataclass
class Memory:
    """Bytes a stage holds at its peak, by kind (summed over its processes); `processes` Python processes besides
    the driver (Ray workers, whose baseline the device calibration measures), `helper_actors` light Ray actors, and
    whether Ray's daemons run."""

    weights: float = 0.0
    optimizer: float = 0.0
    activation_sequences: list[tuple[float, float, float]] = field(default_factory=list)
    """(sequences, activation bytes per sequence with every weight trained, trained fraction) per live batch."""
    transient: float = 0.0
    """Forward-only temporaries: logits, [positions, vocab] chunks, hidden states kept between passes."""
    kv_cache: float = 0.0
    object_store: float = 0.0
    processes: int = 0
    helper_actors: int = 0
    """Light Ray actors beside the workers (Ray Train's), each at the calibrated actor baseline."""
    ray: bool = True


@dataclass
class StageWork:
    name: str
    lanes: list[Lane] = field(default_factory=list)
    driver: Lane = field(default_factory=Lane)
    """The driver's own passes, after the lanes (at its thread count)."""
    serial: list[Lane] = field(default_factory=list)
    """More of the driver's passes at other thread counts, one lane after another."""
    memory: Memory = field(default_factory=Memory)
    tokens: int = 0
    workers: int = 0
    """Ray workers the stage starts (each pays the device's worker start-up time, in parallel)."""
    notes: list[str] = field(default_factory=list)
    mip_solves: int = 0
    mip_variables: int = 0
    batch_sequences: int = 0
    """Sequences per training micro-batch (BLD, GKD): what the largest-batch figure is compared with."""
    train_activation_bytes: float = 0.0
    model_bytes: float = 0.0
    """Memory a training worker holds besides activations (for the largest batch that fits)."""
    on_device: bool = True
    """Whether the stage's work sits on the accelerator (parent, data and export work in host memory)."""


# ------------------------------------------------------------------------------------------------ counting

_SHAPES: dict[tuple[int, BlockConfig], Any] = {}


def shape_of(config: Any, block: BlockConfig) -> Any:
    """puzzle.stages.profile.costs.block_shape, memoised per (config, block): a job counts the same blocks often."""
    from puzzle.stages.profile.costs import block_shape

    key = (id(config), block)
    if key not in _SHAPES:
        _SHAPES[key] = (config, block_shape(config, block))  # the config is kept so its id is not reused
    return _SHAPES[key][1]


def block_flops(config: Any, block: BlockConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one block over sequences of `seq_len` tokens (causal attention, no cache)."""
    shape = shape_of(config, block)
    return 2.0 * shape.matmul_params + 2.0 * shape.attention_heads * config.head_dim * (seq_len + 1)


def head_flops(config: Any) -> float:
    """LM head FLOPs per token (the final norm is not counted)."""
    return 2.0 * config.hidden_size * config.vocab_size


def block_params(config: Any, block: BlockConfig) -> int:
    return shape_of(config, block).num_params


def fixed_params(config: Any) -> int:
    from puzzle.stages.profile.costs import fixed_num_params

    return fixed_num_params(config)


def block_activation_bytes(config: Any, block: BlockConfig, seq_len: int, elem: int) -> float:
    """Activation bytes one sequence leaves for the backward of a block with every weight trained: per token the
    subblocks' inputs, projections and outputs (attention: norm, q, k, v, output and its projection, plus the
    [heads, L] probabilities of eager attention; FFN: norm, gate, up, activation and down)."""
    d, hd = config.hidden_size, config.head_dim
    per_token = 0.0
    if not block.attention.no_op:
        kv = block.attention.num_key_value_heads(config.num_attention_heads)
        heads = config.num_attention_heads
        per_token += 4 * d + heads * hd + 2 * kv * hd + heads * seq_len
    if not block.ffn.no_op:
        f = block.ffn.intermediate_size or config.intermediate_size
        per_token += 2 * d + 4 * f
    return per_token * seq_len * elem


def head_activation_bytes(config: Any, seq_len: int) -> float:
    """The logits of one sequence in fp32 and their log-softmax (what a loss over the vocabulary keeps)."""
    return 2.0 * 4 * config.vocab_size * seq_len


def parent_blocks(config: Any) -> list[BlockConfig]:
    return [config.block_config(i) for i in range(config.num_hidden_layers)]


def model_flops(config: Any, blocks: Sequence[BlockConfig], seq_len: int, head: bool = True) -> float:
    """Forward FLOPs per token of a model of `blocks` (with its LM head unless head=False)."""
    return sum(block_flops(config, b, seq_len) for b in blocks) + (head_flops(config) if head else 0.0)


def decode_step(config: Any, blocks: Sequence[BlockConfig], batch: int, context: int, elem: int) -> Pass:
    """One decode step of a model of `blocks` at (batch, context): FLOPs, bytes read (weights, KV cache, head) and
    kernel launches."""
    flops = head_flops(config) * batch
    read = config.vocab_size * config.hidden_size * elem
    kernels = 4
    for b in blocks:
        shape = shape_of(config, b)
        flops += batch * (2.0 * shape.matmul_params + 4.0 * shape.attention_heads * config.head_dim * context)
        read += shape.num_params * elem + batch * context * shape.kv_elements_per_token * elem
        kernels += KERNELS_PER_SUBBLOCK * (int(not b.attention.no_op) + int(not b.ffn.no_op)) + 1
    return Pass("decode", 1, flops, rows=batch, width=config.hidden_size, bytes=read, kernels=kernels)


def forward(calls: float, flops_per_token: float, rows: int, width: int) -> Pass:
    return Pass("forward", calls, flops_per_token * rows, rows=rows, width=width)


def train(calls: float, flops_per_token: float, rows: int, width: int, trained: float) -> Pass:
    return Pass("train", calls, 3.0 * flops_per_token * rows, rows=rows, width=width, trained=trained)


def optimizer_step(calls: float, params: float) -> Pass:
    """AdamW steps over `params` trained parameters: memory traffic, at the device's byte rate."""
    return Pass("memory", calls, float(params) * STEP_BYTES)


def vocab(calls: float, rows: int, config: Any) -> Pass:
    """One pass of metrics over [rows, vocab] logits: the rate is calibrated on the scoring stage's own
    (puzzle.stages.score.MetricTotals: a log-softmax, the KL against the parent, a gather and a max)."""
    return Pass("vocab", calls, float(rows) * config.vocab_size, rows=rows, width=config.hidden_size)


def child_blocks(config: Any, speedup: float | None) -> list[BlockConfig]:
    """A stand-in for the child the search will pick, before it exists: the parent's layers with every FFN narrowed
    so the layers' matrix parameters shrink by the budget's speed-up (decode cost follows weight bytes); the parent
    itself without a speed-up budget. The estimate names this assumption."""
    blocks = parent_blocks(config)
    if not speedup or speedup <= 1:
        return blocks
    total = sum(shape_of(config, b).matmul_params for b in blocks)
    keep = total / speedup
    out = []
    for b in blocks:
        attn = shape_of(config, BlockConfig(b.attention, FFNConfig(no_op=True))).matmul_params
        ffn_budget = max(0.0, keep / len(blocks) - attn)
        width = int(ffn_budget / (3 * config.hidden_size))
        ffn = FFNConfig(no_op=True) if width < 8 else FFNConfig(intermediate_size=width)
        out.append(BlockConfig(b.attention, ffn))
    return out


def ceil_div(a: float, b: float) -> int:
    return int(math.ceil(a / max(b, 1)))
