"""The GKD loss (docs/method.md section 6): per-layer cosine distance of the residual stream, KL of the next-token
distributions and an optional LM term, with the child's forward that yields every layer's output."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

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
    if len(child_hidden) != len(parent_hidden):
        raise ConfigError(
            f"child has {len(child_hidden)} layers, the parent {len(parent_hidden)}; GKD compares layers one to one"
        )
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


def compute_gkd_loss(
    child: nn.Module, parent: nn.Module, input_ids: torch.Tensor, cfg: GKDConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward both models on `input_ids` (the parent without autograd) and return gkd_loss with cfg's weights."""
    with torch.no_grad():
        parent_hidden, parent_logits = layer_outputs(parent, input_ids)
    child_hidden, child_logits = layer_outputs(child, input_ids)
    return weighted_gkd_loss(child_hidden, child_logits, parent_hidden, parent_logits, input_ids, cfg)


class DistillForward(nn.Module):
    """Wraps the child so DistributedDataParallel sees one forward returning (layer outputs, logits)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return layer_outputs(self.model, input_ids)
