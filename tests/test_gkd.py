"""GKD: the loss (zero at child == parent, gradient only into the child), schedule, data order, checkpoints, and a
short run on Ray Train's TorchTrainer that resumes from its checkpoint."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import pytest
import torch
from tiny import CHILD_BLOCKS, tiny_puzzle_config
from tiny import TINY_VOCAB as VOCAB

from puzzle.config import GKDConfig
from puzzle.model.modeling_puzzle import PuzzleForCausalLM
from puzzle.stages.gkd import (
    WorkerArgs,
    batch_rows,
    compute_gkd_loss,
    gkd_loss,
    layer_outputs,
    load_checkpoint,
    lr_factor,
    pack_model,
    plan,
    run_gkd,
    save_checkpoint,
    unpack_model,
    weights_digest,
)


@pytest.fixture
def parent() -> PuzzleForCausalLM:
    return PuzzleForCausalLM(tiny_puzzle_config()).eval()


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 16))


def checkpoint_state(run_dir, step: int) -> dict:
    """state.json of a GKD run's checkpoint at `step`, where Ray Train stored it."""
    return json.loads((run_dir / f"step_{step:07d}" / "state.json").read_text())


def test_layer_outputs_are_the_models_forward(parent, ids):
    child = PuzzleForCausalLM(tiny_puzzle_config(CHILD_BLOCKS)).eval()
    for model in (parent, child):
        hidden, logits = layer_outputs(model, ids)
        assert len(hidden) == 3 and hidden[0].shape == (4, 16, 32)
        torch.testing.assert_close(logits, model(input_ids=ids).logits)


def test_loss_is_zero_when_child_equals_parent(parent, ids):
    child = copy.deepcopy(parent)
    loss, parts = compute_gkd_loss(child, parent, ids, GKDConfig(lm_weight=0.0))
    assert abs(loss.item()) < 1e-5
    assert abs(parts["kl"]) < 1e-6 and abs(parts["cosine"]) < 1e-5


def test_gradient_reaches_only_the_child(parent, ids):
    child = PuzzleForCausalLM(tiny_puzzle_config(CHILD_BLOCKS))
    loss, parts = compute_gkd_loss(child, parent, ids, GKDConfig())
    assert parts["cosine"] > 0 and parts["kl"] > 0
    loss.backward()
    for name, p in parent.named_parameters():
        assert p.grad is None, f"parent parameter {name} received a gradient"
    grads = {name: p.grad for name, p in child.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert sum(g.abs().sum().item() for g in grads.values()) > 0


def test_loss_parts_match_their_definitions(parent, ids):
    child = PuzzleForCausalLM(tiny_puzzle_config(CHILD_BLOCKS)).eval()
    with torch.no_grad():
        hc, lc = layer_outputs(child, ids)
        hp, lp = layer_outputs(parent, ids)
        loss, parts = gkd_loss(hc, lc, hp, lp, ids, cosine_weight=0.5, kl_weight=2.0, lm_weight=0.25)
    cos = sum((1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).mean() for a, b in zip(hc, hp, strict=True))
    p, q = lp.softmax(-1), lc.softmax(-1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    lm = torch.nn.functional.cross_entropy(lc[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(parts["cosine"], cos.item(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["kl"], kl.item(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(parts["lm"], lm.item(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.item(), 0.5 * cos.item() + 2 * kl.item() + 0.25 * lm.item(), rtol=1e-4, atol=1e-6)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, 100, 10, "cosine", 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)
    assert lr_factor(50, 100, 0, "constant") == 1.0
    assert lr_factor(99, 100, 0, "linear", 0.0) == pytest.approx(0.01)


def test_plan_spends_the_token_budget():
    cfg = GKDConfig(tokens=10_000, batch_size=4, grad_accum=2, num_workers=2, warmup_ratio=0.1)
    p = plan(cfg, seq_len=32)
    assert p["tokens_per_step"] == 4 * 2 * 2 * 32
    assert p["steps"] == 10_000 // 512 and p["warmup_steps"] == 2
    assert plan(GKDConfig(tokens=0), 32)["steps"] == 0
    assert plan(GKDConfig(tokens=1, batch_size=4), 32)["steps"] == 1


def test_data_order_is_a_function_of_step_and_rank():
    cfg = GKDConfig(batch_size=3, grad_accum=2, num_workers=2)
    a = batch_rows(5, 1, 1, cfg, num_rows=10, seed=7)
    assert torch.equal(a, batch_rows(5, 1, 1, cfg, num_rows=10, seed=7))
    # Within one epoch every row is used once across steps, micro-batches and ranks.
    first_epoch = torch.cat([batch_rows(0, m, r, cfg, num_rows=12, seed=0) for m in range(2) for r in range(2)])
    assert sorted(first_epoch.tolist()) == list(range(12))


def test_pack_unpack_and_checkpoint_round_trip(tmp_path, parent, ids):
    child = PuzzleForCausalLM(tiny_puzzle_config(CHILD_BLOCKS, tie_word_embeddings=True))
    restored = unpack_model(pack_model(child))
    torch.testing.assert_close(restored(input_ids=ids).logits, child(input_ids=ids).logits)

    optimizer = torch.optim.AdamW(child.parameters(), lr=1e-3)
    loss, _ = compute_gkd_loss(child, parent, ids, GKDConfig())
    loss.backward()
    optimizer.step()
    save_checkpoint(tmp_path, child, optimizer, {"step": 1, "history": [{"step": 1, "loss": 0.5}]})
    fresh = unpack_model(pack_model(PuzzleForCausalLM(tiny_puzzle_config(CHILD_BLOCKS, tie_word_embeddings=True))))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    state = load_checkpoint(tmp_path, fresh, fresh_opt)
    assert state["step"] == 1 and state["history"][0]["loss"] == 0.5
    torch.testing.assert_close(fresh(input_ids=ids).logits, child(input_ids=ids).logits)
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()
    exp_avg = [s["exp_avg"] for s in optimizer.state_dict()["state"].values()]
    torch.testing.assert_close([s["exp_avg"] for s in fresh_opt.state_dict()["state"].values()], exp_avg)


def test_worker_args_are_frozen_and_pickle():
    """The driver hands each Ray Train worker one WorkerArgs, which Ray pickles."""
    args = WorkerArgs(
        cfg=GKDConfig(lr=0.5),
        parent_ref=None,
        child_ref=None,
        data_ref=None,
        run_id="abc",
        steps=8,
        warmup_steps=1,
        tokens_per_step=64,
    )
    assert pickle.loads(pickle.dumps(args)) == args
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.steps = 9  # type: ignore[misc]


def test_weights_digest_sees_one_changed_bit(parent):
    twin = copy.deepcopy(parent)
    assert weights_digest(twin) == weights_digest(parent)
    with torch.no_grad():
        weight = twin.model.layers[1].mlp.down_proj.weight
        weight[3, 5] = torch.nextafter(weight[3, 5], torch.tensor(float("inf")))
    assert weights_digest(twin) != weights_digest(parent)


@pytest.mark.integration
def test_ray_train_gkd_lowers_the_loss_and_resumes(ray_session, tmp_path, parent):
    child = PuzzleForCausalLM(tiny_puzzle_config(CHILD_BLOCKS))
    train_ids = torch.randint(0, VOCAB, (64, 16))
    cfg = GKDConfig(tokens=8 * 4 * 16, batch_size=4, lr=3e-3, warmup_ratio=0.0, checkpoint_every=2)
    first = run_gkd(child, parent, train_ids, cfg, tmp_path, max_steps=3)
    assert first.steps == 3 and first.total_steps == 8 and not first.finished
    # The second call picks up the checkpoint written when the first stopped and continues the step count.
    second = run_gkd(child, parent, train_ids, cfg, tmp_path)
    assert second.resumed_from_step == 3 and second.steps == 8 and second.finished
    assert [h["step"] for h in second.history] == list(range(1, 9))
    assert second.history[:3] == first.history
    losses = [h["loss"] for h in second.history]
    assert losses[-1] < 0.9 * losses[0]
    # A third call finds the finished run and returns its child without training.
    third = run_gkd(child, parent, train_ids, cfg, tmp_path)
    assert third.history == second.history and third.seconds == 0.0
    for a, b in zip(third.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)
    # The returned child carries the trained weights: its loss is the last step's neighbourhood, below the start.
    with torch.no_grad():
        before, _ = compute_gkd_loss(child, parent, train_ids[:16], cfg)
        after, _ = compute_gkd_loss(second.model, parent, train_ids[:16], cfg)
    assert after < before
    # The one worker recorded the digest of the weights it checkpointed.
    assert checkpoint_state(tmp_path / second.run_name, 8)["replica_digests"] == [weights_digest(second.model)]


@pytest.mark.slow  # three Ray Train runs: ~1-3 minutes on 2 cores
@pytest.mark.integration
def test_gkd_stage_picks_one_of_the_top_k_solutions(ray_session, tmp_path):
    """A known answer: of a pruned child and the parent's own architecture (listed second), short GKD must keep the
    parent's, which starts at KL 0 and stays near it; each candidate's reported validation KL is checked against a
    brute-force KL of its distilled weights."""
    from puzzle.hf.convert import load_parent
    from puzzle.stages.bld import BlockStore
    from puzzle.stages.gkd import distill_solutions
    from puzzle.stages.gkd.assemble import assemble_child
    from tests.tiny import save_tiny_parent

    parent = load_parent(save_tiny_parent(tmp_path, num_hidden_layers=2))
    store = BlockStore(tmp_path / "store")  # parent and no-op variants need no trained weights
    pruned = {"layer_0": "attn_no_op+ffn_64", "layer_1": "attn_group2+ffn_no_op"}
    whole = {"layer_0": "attn_group2+ffn_64", "layer_1": "attn_group2+ffn_64"}  # 4 heads / 2 KV heads, FFN 64
    assert [parent.config.block_config(i).name for i in range(2)] == list(whole.values())
    train_ids = torch.randint(0, 128, (32, 16))
    val_ids = torch.randint(0, 128, (8, 16))
    cfg = GKDConfig(tokens=4 * 4 * 16, batch_size=4, lr=3e-3, warmup_ratio=0.0, checkpoint_every=10, topk_tokens=64)
    out = distill_solutions(parent, store, [pruned, whole], train_ids, val_ids, cfg, tmp_path / "work", topk=2)
    assert out["index"] == 1
    assert [out["model"].config.block_config(i).name for i in range(2)] == list(whole.values())
    assert out["result"].steps == 4 and out["result"].finished
    kls = [c["kl"] for c in out["candidates"]]
    # One short Adam step (lr 3e-3) moves the parent's copy only a little: ~6e-5 here, against ~1.2 when pruned.
    assert kls[1] < 1e-3 and kls[0] > 100 * kls[1]

    # Both short runs are finished: run_gkd hands back each distilled candidate without training again.
    short = dataclasses.replace(cfg, tokens=cfg.topk_tokens)
    with torch.no_grad():
        log_p = parent(input_ids=val_ids).logits[:, :-1].double().log_softmax(-1)
    for i, layers in enumerate([pruned, whole]):
        candidate = assemble_child(parent, store, layers)
        distilled = run_gkd(candidate, parent, train_ids, short, tmp_path / f"work/topk/candidate_{i}")
        assert distilled.steps == 1 and distilled.seconds == 0.0
        with torch.no_grad():
            log_q = distilled.model(input_ids=val_ids).logits[:, :-1].double().log_softmax(-1)
        brute_force_kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
        assert kls[i] == pytest.approx(brute_force_kl, rel=1e-3, abs=1e-6), i


@pytest.mark.slow
@pytest.mark.integration
def test_two_data_parallel_workers_train_one_model(ray_session, tmp_path, parent):
    """Two gloo workers with gradient accumulation: DDP keeps one model (both workers end with bitwise-equal
    weights, which moved from the initial child), and the step count and tokens add up."""
    child = PuzzleForCausalLM(tiny_puzzle_config(CHILD_BLOCKS))
    train_ids = torch.randint(0, VOCAB, (64, 16))
    cfg = GKDConfig(
        tokens=4 * 2 * 2 * 2 * 16, batch_size=2, grad_accum=2, num_workers=2, num_cpus=1, lr=3e-3, warmup_ratio=0.0
    )
    result = run_gkd(child, parent, train_ids, cfg, tmp_path)
    assert result.steps == 4 and result.tokens == 4 * 2 * 2 * 2 * 16
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    # Each worker's digest of its own weights after the last step, by rank, recorded in the final checkpoint.
    digests = checkpoint_state(tmp_path / result.run_name, 4)["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert digests[0] == weights_digest(result.model)
    assert weights_digest(result.model) != weights_digest(child)


def test_worker_progress_lines_are_written_once_under_ray_trains_print(capsys, caplog):
    """Ray Train's workers replace `print` with one that writes to stdout and logs the line too, so the driver showed
    each GKD progress line twice; the worker's `say` writes it once, to stdout only."""
    patch = pytest.importorskip("ray.train.v2._internal.logging.patch_print")  # Ray's own module, not public
    from puzzle.stages.gkd.worker import say

    caplog.set_level("INFO")
    with patch.print_context_manager(patch.redirected_print):
        print("[gkd] through print")  # the patched print: on stdout and in the log
        say("[gkd] through say")
    out = capsys.readouterr().out
    logged = [record.getMessage() for record in caplog.records]
    assert "[gkd] through print" in logged  # the patch is in force here, as in a Ray Train worker
    assert out.count("[gkd] through say") == 1
    assert not any("through say" in message for message in logged)
