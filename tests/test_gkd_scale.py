"""GKD at model sizes that need it: the chunked loss and activation checkpointing leave the loss and its gradients as
they were, the parent stays in its own dtype without gradients, bf16 autocast over fp32 master weights, the new keys'
checks, and FSDP2 sharding (one process here, two Ray Train workers in the integration test) with its checkpoints."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from tiny import CHILD_BLOCKS, tiny_puzzle_config
from tiny import TINY_VOCAB as VOCAB

from puzzle.config import GKDConfig
from puzzle.errors import ConfigError
from puzzle.model.modeling_puzzle import PuzzleForCausalLM
from puzzle.stages.gkd import (
    DistillForward,
    autocast_dtype,
    batch_rows,
    compute_gkd_loss,
    distill_loss,
    layer_outputs,
    pack_model,
    packed_dtype,
    packed_state,
    run_gkd,
    unpack_model,
    weighted_gkd_loss,
    weights_digest,
)

# Every term on, with weights that tell them apart.
WEIGHTS = dict(cosine_weight=0.5, kl_weight=1.0, lm_weight=0.3)


@pytest.fixture
def parent() -> PuzzleForCausalLM:
    return PuzzleForCausalLM(tiny_puzzle_config()).eval().requires_grad_(False)


@pytest.fixture
def child() -> PuzzleForCausalLM:
    return PuzzleForCausalLM(tiny_puzzle_config(CHILD_BLOCKS))


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 16))


def loss_and_grads(child, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """fn() -> loss, backpropagated into a zeroed child; returns the loss and a copy of every gradient."""
    child.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in child.named_parameters()}


def saved_shapes(fn) -> list[torch.Size]:
    """The shapes of the tensors autograd keeps for the backward pass while fn() runs."""
    shapes = []

    def pack(tensor):
        shapes.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return shapes


def reference(child, parent, ids, cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss written plainly: every layer output and the full [batch, seq, vocab] logits of both models."""

    def fn():
        hidden, logits = layer_outputs(child, ids)
        with torch.no_grad():
            parent_hidden, parent_logits = layer_outputs(parent, ids)
        return weighted_gkd_loss(hidden, logits, parent_hidden, parent_logits, ids, cfg)[0]

    return loss_and_grads(child, fn)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])  # 64 = all positions of ids, 1000 more than that
def test_chunked_loss_and_gradients_equal_the_full_logits_loss(parent, child, ids, chunk):
    cfg = GKDConfig(loss_chunk_tokens=chunk, **WEIGHTS)
    expected, expected_grads = reference(child, parent, ids, cfg)
    loss, grads = loss_and_grads(child, lambda: distill_loss(child, parent, ids, cfg)[0])
    torch.testing.assert_close(loss, expected)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], msg=name)
    _, parts = compute_gkd_loss(child, parent, ids, cfg)
    assert parts["kl"] > 0 and parts["lm"] > 0 and parts["cosine"] > 0
    # No logits are kept for the backward pass (it recomputes them a chunk at a time), unlike the plain loss's.
    logits = [s for s in saved_shapes(lambda: distill_loss(child, parent, ids, cfg)) if s[-1] == VOCAB]
    assert not logits
    assert any(
        s[-1] == VOCAB and s.numel() == ids.numel() * VOCAB
        for s in saved_shapes(lambda: reference(child, parent, ids, cfg))
    )


def test_activation_checkpointing_keeps_loss_and_gradients(parent, child, ids):
    plain = GKDConfig(loss_chunk_tokens=5, **WEIGHTS)
    recomputed = GKDConfig(loss_chunk_tokens=5, activation_checkpointing=True, **WEIGHTS)
    expected, expected_grads = loss_and_grads(child, lambda: distill_loss(child, parent, ids, plain)[0])
    loss, grads = loss_and_grads(child, lambda: distill_loss(child, parent, ids, recomputed)[0])
    torch.testing.assert_close(loss, expected)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], msg=name)
    # It is on: the layers' inner activations are not kept, only their inputs.
    kept = [saved_shapes(lambda c=c: distill_loss(child, parent, ids, c)) for c in (plain, recomputed)]
    assert sum(s.numel() for s in kept[1]) < sum(s.numel() for s in kept[0]) / 2


def test_parent_is_held_in_its_dtype_without_gradients(child, ids):
    """A bf16 parent comes back from the object store in bf16 (no fp32 copy), frozen and outside the module that
    DDP / FSDP wrap; the child keeps fp32 weights and gradients, also under bf16 autocast."""
    loaded = PuzzleForCausalLM(tiny_puzzle_config(tie_word_embeddings=True)).to(torch.bfloat16)
    packed = pack_model(loaded, shared=True)
    assert packed_dtype(packed) == torch.bfloat16
    # Shared: the tied embedding is stored once, and the bytes come back through Ray's object store.
    assert packed["state"]["lm_head.weight"] == ("alias", "model.embed_tokens.weight")
    ray_got = pickle.loads(pickle.dumps(packed, protocol=5))
    parent = unpack_model(ray_got, "cpu", packed_dtype(packed), frozen=True).eval().requires_grad_(False)
    assert {p.dtype for p in parent.parameters()} == {torch.bfloat16}
    stored = packed_state(ray_got)["model.layers.0.mlp.up_proj.weight"]
    assert parent.model.layers[0].mlp.up_proj.weight.data_ptr() == stored.data_ptr()  # used in place, not copied
    copied = unpack_model(pack_model(loaded), "cpu", torch.bfloat16)  # the same parent, copied into a fresh model
    with torch.no_grad():
        torch.testing.assert_close(parent(ids).logits, copied(ids).logits, rtol=0, atol=0)
    assert unpack_model(pack_model(child)).lm_head.weight.dtype == torch.float32  # the child: fp32 by default
    model = DistillForward(child, parent, GKDConfig(), autocast=torch.bfloat16)
    assert {id(p) for p in model.parameters()} == {id(p) for p in child.parameters()}
    loss, parts = model(ids)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in parent.parameters())
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in child.parameters())
    # bf16 autocast moves the loss by rounding only.
    exact, _ = distill_loss(child, parent, ids, GKDConfig())
    torch.testing.assert_close(loss, exact, rtol=2e-2, atol=1e-3)
    assert parts.dtype == torch.float32 and not parts.requires_grad


def test_autocast_auto_is_bf16_on_cuda_only():
    assert autocast_dtype("auto", "cuda") == torch.bfloat16
    assert autocast_dtype("auto", "cpu") is None
    assert autocast_dtype("off", "cuda") is None
    assert autocast_dtype("bf16", "cpu") == torch.bfloat16


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("strategy", "zero3", "gkd.strategy='zero3' is not one of ddp, fsdp"),
        ("autocast", "fp16", "gkd.autocast='fp16' is not one of auto, bf16, off"),
        ("loss_chunk_tokens", 0, "gkd.loss_chunk_tokens=0 must be > 0"),
    ],
)
def test_scale_keys_are_checked_in_one_line(key, value, message):
    with pytest.raises(ConfigError, match=f"^{message}$") as info:
        GKDConfig(**{key: value})
    assert "\n" not in str(info.value)


def test_autocast_off_survives_yaml():
    """YAML reads a bare `off` as false; the job still means "off"."""
    from omegaconf import OmegaConf

    loaded = OmegaConf.merge(OmegaConf.structured(GKDConfig), OmegaConf.create("autocast: off\nstrategy: fsdp\n"))
    cfg = OmegaConf.to_object(loaded)
    assert (cfg.autocast, cfg.strategy) == ("off", "fsdp")


def test_fsdp_in_one_process_trains_like_the_full_model_and_checkpoints(tmp_path, parent, child, ids):
    """FSDP2 over a one-process gloo group: the sharded child's loss, gradient norm and step match the plain
    child's, and its gathered checkpoint loads back into a fresh sharded child (weights and AdamW state)."""
    import torch.distributed as dist

    from puzzle.stages.gkd.checkpoint import load_checkpoint, state_digest, write_checkpoint
    from puzzle.stages.gkd.parallel import gather_state, grad_norm, load_sharded, wrap_model

    cfg = GKDConfig(strategy="fsdp", activation_checkpointing=True, loss_chunk_tokens=9, **WEIGHTS)
    packed = pack_model(child)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        plain = unpack_model(packed)
        plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
        sharded = unpack_model(packed)
        model = wrap_model(DistillForward(sharded, parent, cfg, None), cfg, torch.device("cpu"), 1)
        opt = torch.optim.AdamW(sharded.parameters(), lr=1e-2)
        for _ in range(2):
            loss, _ = model(ids)
            loss.backward()
            expected, _ = distill_loss(plain, parent, ids, cfg)
            expected.backward()
            torch.testing.assert_close(loss, expected)
            assert grad_norm(sharded.parameters(), 1.0) == pytest.approx(grad_norm(plain.parameters(), 1.0), rel=1e-5)
            for o in (opt, plain_opt):
                o.step()
                o.zero_grad(set_to_none=True)
        weights, optimizer_state = gather_state(sharded, opt)
        assert sorted(weights) == sorted(plain.state_dict())
        for name, tensor in plain.state_dict().items():
            torch.testing.assert_close(weights[name], tensor, msg=name)
        write_checkpoint(tmp_path / "ckpt", weights, optimizer_state, {"step": 2})
        # The file is the plain child's format: the driver loads it into an unsharded model.
        fresh = unpack_model(packed)
        assert load_checkpoint(tmp_path / "ckpt", fresh)["step"] == 2
        assert weights_digest(fresh) == state_digest(weights)
        again = unpack_model(packed)
        wrap_model(DistillForward(again, parent, cfg, None), cfg, torch.device("cpu"), 1)
        again_opt = torch.optim.AdamW(again.parameters(), lr=1e-2)
        assert load_sharded(tmp_path / "ckpt", again, again_opt)["step"] == 2
        reloaded_weights, reloaded_opt = gather_state(again, again_opt)
        assert state_digest(reloaded_weights) == state_digest(weights)
        for name, entry in optimizer_state["state"].items():
            torch.testing.assert_close(reloaded_opt["state"][name]["exp_avg_sq"], entry["exp_avg_sq"], msg=name)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two Ray Train runs of two workers: 30-70 s on 2 shared cores
@pytest.mark.integration
def test_two_fsdp_workers_train_resume_and_checkpoint_the_full_child(ray_session, tmp_path, parent, child):
    """Two gloo workers sharding the child (FSDP2) with activation checkpointing and a chunked loss: the first step's
    logged loss is the mean of each worker's loss on its rows, a run stopped after 2 steps resumes from its sharded
    state to the end, and the checkpoint holds the full child."""
    train_ids = torch.randint(0, VOCAB, (64, 16))
    cfg = GKDConfig(
        tokens=4 * 2 * 2 * 16,
        batch_size=2,
        num_workers=2,
        num_cpus=1,
        lr=3e-3,
        warmup_ratio=0.0,
        checkpoint_every=2,
        strategy="fsdp",
        activation_checkpointing=True,
        loss_chunk_tokens=5,
        **WEIGHTS,
    )
    first = run_gkd(child, parent, train_ids, cfg, tmp_path, max_steps=2)
    assert first.steps == 2 and not first.finished
    with torch.no_grad():
        rows = [train_ids[batch_rows(0, 0, rank, cfg, len(train_ids), cfg.seed)] for rank in range(2)]
        expected = sum(compute_gkd_loss(child, parent, r, cfg)[1]["loss"] for r in rows) / 2
    assert first.history[0]["loss"] == pytest.approx(expected, rel=1e-5)
    second = run_gkd(child, parent, train_ids, cfg, tmp_path)
    assert second.resumed_from_step == 2 and second.steps == 4 and second.finished
    assert second.history[:2] == first.history
    assert second.history[-1]["loss"] < second.history[0]["loss"]
    state = json.loads((tmp_path / second.run_name / "step_0000004" / "state.json").read_text())
    assert state["replica_digests"] == [weights_digest(second.model)]
    assert weights_digest(second.model) != weights_digest(child)
