"""The GKD loss (docs/method.md section 6): per-layer cosine distance of the residual stream, KL of the next-token
distributions and an optional LM term.

`distill_loss` is what training runs: parent and child walk their layers in step, the parent without autograd in its
own dtype, the child under optional bf16 autocast and activation checkpointing; the KL and LM terms go through the
LM heads `gkd.loss_chunk_tokens` positions at a time. `layer_outputs` + `gkd_loss` are the same loss written plainly
(full logits of both models at once), kept as its reference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from puzzle.config import GKDConfig
from puzzle.errors import ConfigError


def layer_outputs(model: nn.Module, input_ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run a PuzzleForCausalLM on [batch, seq] token ids; return (the output of every decoder layer, logits).

    Walks embed -> layers -> norm -> lm_head explicitly (causal attention, no cache) so the per-layer hidden states
    are exactly the residual stream after each layer, independent of how transformers records hidden states.
    """
    inner = model.model
    hidden = inner.embed_tokens(input_ids)
    position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
    position_embeddings = inner.rotary_emb(hidden, position_ids)
    outputs = []
    for layer in inner.layers:
        hidden = layer(hidden, position_embeddings)
        outputs.append(hidden)
    logits = model.lm_head(inner.norm(hidden))
    return outputs, logits


def _check_layers(child: int, parent: int) -> None:
    if child != parent:
        raise ConfigError(f"child has {child} layers, the parent {parent}; GKD compares layers one to one")


def gkd_loss(
    child_hidden: Sequence[torch.Tensor],
    child_logits: torch.Tensor,
    parent_hidden: Sequence[torch.Tensor],
    parent_logits: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    *,
    cosine_weight: float = 1.0,
    kl_weight: float = 1.0,
    lm_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GKD loss and its parts ({"cosine", "kl", "lm", "loss"} as floats); parent tensors are treated as targets."""
    _check_layers(len(child_hidden), len(parent_hidden))
    zero = child_logits.new_zeros(())
    cosine = zero
    if cosine_weight:
        for hc, hp in zip(child_hidden, parent_hidden, strict=True):
            cosine = cosine + (1.0 - F.cosine_similarity(hc.float(), hp.detach().float(), dim=-1)).mean()
    kl = zero
    vocab = child_logits.shape[-1]
    if kl_weight:
        log_q = F.log_softmax(child_logits.float(), dim=-1).reshape(-1, vocab)
        log_p = F.log_softmax(parent_logits.detach().float(), dim=-1).reshape(-1, vocab)
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum") / log_q.shape[0]
    lm = zero
    if lm_weight:
        if input_ids is None:
            raise ConfigError("gkd.lm_weight > 0 needs the input ids for the LM loss")
        lm = F.cross_entropy(child_logits[:, :-1].float().reshape(-1, vocab), input_ids[:, 1:].reshape(-1))
    loss = cosine_weight * cosine + kl_weight * kl + lm_weight * lm
    parts = {"loss": loss.item(), "cosine": cosine.item(), "kl": kl.item(), "lm": lm.item()}
    return loss, parts


def weighted_gkd_loss(
    child_hidden: Sequence[torch.Tensor],
    child_logits: torch.Tensor,
    parent_hidden: Sequence[torch.Tensor],
    parent_logits: torch.Tensor,
    input_ids: torch.Tensor,
    cfg: GKDConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """gkd_loss with cfg's weights (the one place the worker and compute_gkd_loss read them)."""
    return gkd_loss(
        child_hidden,
        child_logits,
        parent_hidden,
        parent_logits,
        input_ids,
        cosine_weight=cfg.cosine_weight,
        kl_weight=cfg.kl_weight,
        lm_weight=cfg.lm_weight,
    )


PARTS = ("loss", "cosine", "kl", "lm")
"""The order of the parts tensor `distill_loss` returns."""


def autocast_dtype(mode: str, device_type: str) -> torch.dtype | None:
    """gkd.autocast on a device: the autocast dtype of the child's forward, None for none ("auto": bf16 on CUDA)."""
    if mode == "bf16" or (mode == "auto" and device_type == "cuda"):
        return torch.bfloat16
    return None


@contextlib.contextmanager
def _frozen(device_type: str) -> Iterator[None]:
    """The parent's side: no autograd, and no autocast (it computes in the dtype it is held in)."""
    with torch.no_grad(), torch.autocast(device_type, enabled=False):
        yield


def _recomputed(fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    """fn(*args), keeping only its inputs for the backward pass, which runs fn again (exact, non-reentrant)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False)


def _cosine_distance(child: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """Mean over positions of 1 - cos(child, parent), in fp32."""
    return (1.0 - F.cosine_similarity(child.float(), parent.float(), dim=-1)).mean()


def _head_sums(
    child_head: nn.Module,
    parent_head: nn.Module,
    child_hidden: torch.Tensor,
    parent_hidden: torch.Tensor,
    targets: torch.Tensor,
    kl: bool,
    lm: bool,
) -> torch.Tensor:
    """[KL(p_parent || q_child) summed, LM cross-entropy summed] over one chunk of final-norm hidden states
    ([n, hidden] each); log-softmax in fp32; targets of -100 are left out of the LM sum."""
    log_q = F.log_softmax(child_head(child_hidden).float(), dim=-1)
    zero = log_q.new_zeros(())
    kl_sum = lm_sum = zero
    if kl:
        with _frozen(parent_hidden.device.type):
            log_p = F.log_softmax(parent_head(parent_hidden).float(), dim=-1)
        kl_sum = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    if lm:
        lm_sum = F.nll_loss(log_q, targets, ignore_index=-100, reduction="sum")
    return torch.stack((kl_sum, lm_sum))


def distill_loss(
    child: nn.Module,
    parent: nn.Module,
    input_ids: torch.Tensor,
    cfg: GKDConfig,
    *,
    autocast: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The GKD loss of two PuzzleForCausalLMs on [batch, seq] token ids; returns (loss, detached fp32 parts in the
    order of PARTS). Equal to gkd_loss with cfg's weights, computed to fit large models:

    - the parent runs layer by layer beside the child, without autograd, in its own dtype; only its layer outputs
      (for the cosine term) are kept, as they are;
    - the child runs under `autocast` (a dtype, or None), each decoder layer recomputed in the backward pass when
      cfg.activation_checkpointing;
    - the KL / LM terms go through both LM heads cfg.loss_chunk_tokens positions at a time, each chunk recomputed in
      the backward pass, so [chunk, vocab] logits exist for one chunk at a time.
    """
    inner, parent_inner = child.model, parent.model
    _check_layers(len(inner.layers), len(parent_inner.layers))
    device_type = input_ids.device.type
    position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
    with _frozen(device_type):
        parent_hidden = parent_inner.embed_tokens(input_ids)
        parent_positions = parent_inner.rotary_emb(parent_hidden, position_ids)
    with torch.autocast(device_type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        hidden = inner.embed_tokens(input_ids)
        positions = inner.rotary_emb(hidden, position_ids)
        cosine = hidden.new_zeros((), dtype=torch.float32)
        for layer, parent_layer in zip(inner.layers, parent_inner.layers, strict=True):
            with _frozen(device_type):
                parent_hidden = parent_layer(parent_hidden, parent_positions)
            if cfg.activation_checkpointing and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, positions, use_reentrant=False)
            else:
                hidden = layer(hidden, positions)
            if cfg.cosine_weight:
                cosine = cosine + _recomputed(_cosine_distance, hidden, parent_hidden)
        sums = cosine.new_zeros(2)
        if cfg.kl_weight or cfg.lm_weight:
            hidden = inner.norm(hidden).flatten(0, 1)
            with _frozen(device_type):
                parent_hidden = parent_inner.norm(parent_hidden).flatten(0, 1)
            # The next token of each position; the last position of a row has none.
            targets = F.pad(input_ids[:, 1:], (0, 1), value=-100).flatten()
            terms = (bool(cfg.kl_weight), bool(cfg.lm_weight))
            for start in range(0, hidden.shape[0], cfg.loss_chunk_tokens):
                chunk = slice(start, start + cfg.loss_chunk_tokens)
                sums = sums + _recomputed(
                    lambda h, p, t: _head_sums(child.lm_head, parent.lm_head, h, p, t, *terms),
                    hidden[chunk],
                    parent_hidden[chunk],
                    targets[chunk],
                )
    kl = sums[0] / input_ids.numel()
    lm = sums[1] / max(1, input_ids.shape[0] * (input_ids.shape[1] - 1))
    loss = cfg.cosine_weight * cosine + cfg.kl_weight * kl + cfg.lm_weight * lm
    return loss, torch.stack((loss, cosine, kl, lm)).detach().float()


def compute_gkd_loss(
    child: nn.Module, parent: nn.Module, input_ids: torch.Tensor, cfg: GKDConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """distill_loss with cfg's settings (autocast resolved on the ids' device), its parts as {"loss", "cosine", "kl",
    "lm"} floats."""
    loss, parts = distill_loss(
        child, parent, input_ids, cfg, autocast=autocast_dtype(cfg.autocast, input_ids.device.type)
    )
    return loss, dict(zip(PARTS, parts.tolist(), strict=True))


class DistillForward(nn.Module):
    """The child as DDP / FSDP see it: forward(ids) -> distill_loss's (loss, parts). The frozen parent is held outside
    the module tree (in a tuple), so no wrapper syncs, shards or casts its parameters."""

    def __init__(self, child: nn.Module, parent: nn.Module, cfg: GKDConfig, autocast: torch.dtype | None) -> None:
        super().__init__()
        self.child = child
        self.frozen = (parent,)
        self.cfg = cfg
        self.autocast = autocast

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return distill_loss(self.child, self.frozen[0], input_ids, self.cfg, autocast=self.autocast)
