"""Blockwise local distillation (puzzle.stages.bld): planning, block keys, the shared parent forward, exact checkpoints,
the
block stores, and BLD on a real Ray cluster (training lowers every block's held-out error, resume, a killed trainer,
coupled mode, and through the runner: a rerun trains only blocks whose key is new)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from puzzle.config import RESOURCE_KEYS, BLDConfig
from puzzle.errors import ConfigError, PuzzleError
from puzzle.model.block_config import AttentionConfig, BlockConfig, FFNConfig
from puzzle.stages.bld import (
    BlockCache,
    BlockRun,
    BlockStore,
    batch_rows,
    block_hash,
    initial_layer,
    load_checkpoint,
    lr_at,
    parent_activations,
    plan_blocks,
    position_embeddings,
    run_bld,
    save_checkpoint,
    tokens_fingerprint,
)
from puzzle.stages.parent import loaded_parent_fingerprint
from tests.tiny import save_tiny_parent

SEQ = 16
ATTN = [AttentionConfig(n_heads_in_group=4), AttentionConfig(replace_with_linear=True), AttentionConfig(no_op=True)]
FFN = [FFNConfig(intermediate_size=32), FFNConfig(replace_with_linear=True), FFNConfig(no_op=True)]
VARIANTS = [{"attention": ATTN, "ffn": FFN}] * 2
# 12 steps of 4 x 16 tokens; checkpoints every 3 steps so resumes and restarts replay at most 2 steps.
CFG = dict(tokens=12 * 4 * SEQ, lr=3e-3, batch_size=4, num_workers=2, num_cpus=1, checkpoint_every=3)
CFG.update(calibration_tokens=24 * SEQ, warmup_ratio=0.1, schedule="cosine")


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    from puzzle.hf.convert import load_parent

    return load_parent(save_tiny_parent(tmp_path_factory.mktemp("parent")))


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(4, 128, (64, SEQ), generator=torch.Generator().manual_seed(0))


def _run(parent, tokens, out: Path, variants=VARIANTS, **overrides):
    cfg = BLDConfig(**{**CFG, **overrides.pop("cfg", {})})
    return run_bld(parent, variants, tokens[:32], tokens[32:], cfg, out, out / "work", **overrides)


def _library(store: BlockStore) -> dict[str, tuple]:
    """Every entry's (hash, nmse_init, nmse_trained, weights) for comparing two libraries."""
    out = {}
    for layer, kinds in store.index.items():
        for kind, entries in kinds.items():
            for name, e in entries.items():
                weights = load_file(str(store.root / e["file"])) if e["file"] else {}
                out[f"{layer}/{kind}/{name}"] = (e["hash"], e["nmse_init"], e["nmse_trained"], weights)
    return out


def _assert_same_library(a: BlockStore, b: BlockStore) -> None:
    lib_a, lib_b = _library(a), _library(b)
    assert lib_a.keys() == lib_b.keys()
    for key, (hash_a, init_a, trained_a, w_a) in lib_a.items():
        hash_b, init_b, trained_b, w_b = lib_b[key]
        assert (hash_a, init_a, trained_a) == (hash_b, init_b, trained_b), key
        assert w_a.keys() == w_b.keys(), key
        for name in w_a:
            assert torch.equal(w_a[name], w_b[name]), f"{key}: {name} differs"


# --------------------------------------------------------------------------------------------------------------------
# Without Ray
# --------------------------------------------------------------------------------------------------------------------


def test_decoupled_plans_m_plus_n_blocks_per_layer_and_coupled_m_times_n(parent):
    decoupled = plan_blocks(parent.config, VARIANTS, "decoupled")
    coupled = plan_blocks(parent.config, VARIANTS, "coupled")
    m, n = len(ATTN) + 1, len(FFN) + 1  # the parent's own variants are always included
    for layer in range(2):
        mine = [s for s in decoupled if s.layer == layer]
        assert len(mine) == m + n
        assert sum(s.trainable for s in mine) == (m - 2) + (n - 2)  # parent and no-op variants are not trained
        pairs = [s for s in coupled if s.layer == layer]
        assert len(pairs) == m * n
        assert sum(s.trainable for s in pairs) == m * n - 4  # {parent, no_op} x {parent, no_op} need no training
    assert [s.parent for s in decoupled if s.layer == 0 and s.kind == "attention"] == [True, False, False, False]
    with pytest.raises(ConfigError, match="3 layers"):
        plan_blocks(parent.config, VARIANTS + VARIANTS[:1], "decoupled")


def _keys(parent, variants=VARIANTS, parent_fp="fp", **cfg) -> dict[str, str]:
    config = BLDConfig(**{**CFG, **cfg})
    specs = plan_blocks(parent.config, variants, config.mode)
    return {f"{s.layer}/{s.kind}/{s.name}": block_hash(s, parent_fp, "data", config) for s in specs}


def _trainable(parent, variants=VARIANTS) -> set[str]:
    return {f"{s.layer}/{s.kind}/{s.name}" for s in plan_blocks(parent.config, variants) if s.trainable}


def test_block_keys_change_only_with_what_determines_the_block(parent):
    keys = _keys(parent)
    resources = {"num_workers": 5, "num_cpus": 3, "num_gpus": 1, "checkpoint_every": 1}
    resources.update(max_restarts=0, max_inflight_steps=7)
    assert set(resources) == RESOURCE_KEYS["bld"]
    assert _keys(parent, **resources) == keys  # how blocks are trained, not what they learn

    more = [{"attention": ATTN, "ffn": [*FFN, FFNConfig(intermediate_size=16)]}] * 2
    grown = _keys(parent, variants=more)
    assert {k: v for k, v in grown.items() if k in keys} == keys  # other variants are not part of a block's key
    assert sorted(set(grown) - set(keys)) == ["0/ffn/ffn_16", "1/ffn/ffn_16"]

    trained = _trainable(parent)
    for change in ({"lr": 1e-2}, {"seed": 1}, {"tokens": 24 * 4 * SEQ}, {"grad_clip": 0.5}):
        other = _keys(parent, **change)
        assert {k for k in keys if other[k] != keys[k]} == trained, change  # parent and no-op blocks do not train

    fp32, bf16 = loaded_parent_fingerprint("ckpt", "float32"), loaded_parent_fingerprint("ckpt", "bfloat16")
    assert fp32 != bf16
    a, b = _keys(parent, parent_fp=fp32), _keys(parent, parent_fp=bf16)
    assert all(a[k] != b[k] for k in a)  # the parent's dtype changes its activations, so every block


def test_every_bld_setting_but_resources_is_in_the_block_key():
    from puzzle.stages.bld import training_signature

    fields = {f.name for f in dataclasses.fields(BLDConfig)}
    assert set(training_signature(BLDConfig())) == fields - RESOURCE_KEYS["bld"]


def test_block_cache_never_shows_a_half_written_block(tmp_path, monkeypatch):
    import puzzle.stages.bld.store as store_module

    cache = BlockCache(tmp_path / "blocks")
    state = {"mlp.up_proj.weight": torch.ones(2, 2)}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        cache.put("k1", {"init": "x"}, state)
    assert cache.get("k1") is None and cache.keys() == []  # only a .tmp- directory exists
    assert [p.name.startswith(".tmp-") for p in cache.root.iterdir()] == [True]
    cache.clean_partial()
    assert list(cache.root.iterdir()) == []

    monkeypatch.undo()
    cache.put("k1", {"init": "x"}, state)
    cache.put("k2", {"init": "no_op"}, None)
    assert cache.keys() == ["k1", "k2"]
    assert cache.get("k1")["init"] == "x" and torch.equal(
        load_file(str(cache.weights("k1")))["mlp.up_proj.weight"], state["mlp.up_proj.weight"]
    )
    assert cache.weights("k2") is None and cache.get("k2") is not None
    cache.weights("k1").unlink()  # weights deleted by hand: the block is gone, and is trained again
    assert cache.get("k1") is None
    cache.put("k1", {"init": "y"}, state)
    assert cache.get("k1")["init"] == "y"


def test_shared_parent_forward_reproduces_the_model(parent, tokens):
    batch = tokens[:3]
    states, mids = parent_activations(parent, batch)
    assert len(states) == 3 and len(mids) == 2
    logits = parent.lm_head(parent.model.norm(states[-1]))
    assert_close(logits, parent(batch).logits)
    pos = position_embeddings(parent, SEQ)
    for i, layer in enumerate(parent.model.layers):
        assert_close(layer(states[i], pos), states[i + 1])
        assert_close(states[i] + layer.attention_delta(states[i], pos), mids[i])


def test_trainer_side_parent_prefix_reproduces_the_models_activations(parent, tokens):
    from puzzle.stages.bld.store import layer_state
    from puzzle.stages.bld.train import ParentPrefix

    batch = tokens[:3]
    states, mids = parent_activations(parent, batch)
    embed = parent.model.embed_tokens.weight.detach()
    prefix = ParentPrefix(parent.config, embed, [layer_state(parent, 0)], position_embeddings(parent, SEQ), "cpu")
    got_states, got_mids = prefix.activations(batch, 1)  # a trainer of layer 0 builds layer 0 alone
    assert len(got_states) == 2 and len(got_mids) == 1
    assert_close(got_states[1], states[1])
    assert_close(got_mids[0], mids[0])


def test_trainers_get_consecutive_layers_balanced_with_the_parent_prefix_they_run():
    from puzzle.hf.convert import puzzle_config_from_hf
    from puzzle.stages.bld.plan import assign_blocks
    from tests.tiny import tiny_config

    config = puzzle_config_from_hf(tiny_config(num_hidden_layers=8))
    specs = plan_blocks(config, [{"attention": ATTN, "ffn": FFN}] * 8)
    groups = assign_blocks([s for s in specs if not s.parent], config, 2)
    layers = [sorted({s.layer for s in g}) for g in groups]
    assert [i for g in layers for i in g] == list(range(8))  # consecutive runs covering every layer once
    assert all(g == list(range(g[0], g[-1] + 1)) for g in layers)
    # The later trainer also runs the parent through the earlier trainer's layers: where that forward outweighs the
    # blocks' own work (here: no-op variants, only scored), it gets fewer layers of its own.
    cheap = [s for s in plan_blocks(config, [{"ffn": [FFNConfig(no_op=True)]}] * 8) if not s.parent]
    first, second = (sorted({s.layer for s in g}) for g in assign_blocks(cheap, config, 2))
    assert first + second == list(range(8)) and len(first) > len(second)
    assert len(assign_blocks([s for s in specs if s.layer == 3], config, 4)) == 1  # one layer: one trainer


def test_training_batches_are_a_fixed_stream_of_epoch_permutations():
    first = torch.cat([batch_rows(step, 10, 4, seed=3) for step in range(1, 6)])  # 20 rows = 2 epochs
    again = torch.cat([batch_rows(step, 10, 4, seed=3) for step in range(1, 6)])
    assert torch.equal(first, again)
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    assert not torch.equal(first, torch.cat([batch_rows(step, 10, 4, seed=4) for step in range(1, 6)]))


def test_lr_schedule_warms_up_then_decays():
    cfg = BLDConfig(lr=1.0, warmup_ratio=0.2, schedule="cosine")
    lrs = [lr_at(step, 10, cfg) for step in range(1, 11)]
    assert lrs[:2] == [0.5, 1.0]
    assert lrs[2] == 1.0 and all(a > b for a, b in zip(lrs[2:], lrs[3:], strict=False)) and lrs[-1] > 0
    assert lr_at(5, 10, BLDConfig(lr=1.0, warmup_ratio=0.0, schedule="constant")) == 1.0


def test_checkpoint_and_restore_continue_training_exactly(parent, tokens, tmp_path):
    cfg = BLDConfig(**CFG)
    spec = next(s for s in plan_blocks(parent.config, VARIANTS) if s.name == "attn_group4" and s.layer == 1)
    state = {k: v for k, v in parent.model.layers[1].state_dict().items()}
    states, _ = parent_activations(parent, tokens[:4])
    pos = position_embeddings(parent, SEQ)

    def fresh():
        return BlockRun(spec, initial_layer(spec, parent.config, state, None)[0], cfg, 6)

    straight = fresh()
    for step in range(1, 7):
        straight.train_step(step, states[1], states[2], pos)
    first = fresh()
    for step in range(1, 4):
        first.train_step(step, states[1], states[2], pos)
    save_checkpoint(tmp_path / "ckpt.safetensors", first.checkpoint())
    resumed = fresh()
    resumed.restore(load_checkpoint(tmp_path / "ckpt.safetensors"))
    assert resumed.step == 3
    for step in range(4, 7):
        resumed.train_step(step, states[1], states[2], pos)
    for name, value in straight.layer.state_dict().items():
        assert torch.equal(value, resumed.layer.state_dict()[name]), name
    # only the attention subblock trains; the parent FFN beside it stays frozen
    assert torch.equal(straight.layer.mlp.up_proj.weight, state["mlp.up_proj.weight"])
    assert set(straight.saved_state(torch.float32)) == {
        k for k in state if k.startswith(("input_layernorm", "self_attn"))
    }


def test_store_refuses_unknown_variants_and_writes_atomically(parent, tmp_path):
    store = BlockStore(tmp_path / "lib")
    store.put(0, "ffn", "ffn_32", {"hash": "h", "init": "x"}, {"mlp.up_proj.weight": torch.ones(2, 2)})
    assert json.loads((tmp_path / "lib" / "index.json").read_text())["layer_0"]["ffn"]["ffn_32"]["file"]
    assert not list((tmp_path / "lib").rglob(".*tmp*"))
    assert BlockStore(tmp_path / "lib").is_current(0, "ffn", "ffn_32", "h")
    assert not BlockStore(tmp_path / "lib").is_current(0, "ffn", "ffn_32", "other")
    with pytest.raises(PuzzleError, match="ffn_linear"):
        store.build_layer(
            parent, 0, BlockConfig(parent.config.block_config(0).attention, FFNConfig(replace_with_linear=True))
        )
    # the parent pair needs no library entries: it is the parent's layer
    layer = store.build_layer(parent, 1, parent.config.block_config(1))
    for name, value in parent.model.layers[1].state_dict().items():
        assert torch.equal(layer.state_dict()[name], value)


def test_bad_token_inputs_are_refused_before_any_training(parent, tokens, tmp_path):
    from datasets import Dataset

    cfg = BLDConfig(**CFG)
    with pytest.raises(ConfigError, match="one length"):
        run_bld(parent, VARIANTS, tokens[:8], tokens[:8, :8], cfg, tmp_path / "a")
    with pytest.raises(ConfigError, match="vocabulary has 128 ids"):
        run_bld(parent, VARIANTS, tokens[:8], tokens[:8] + 200, cfg, tmp_path / "a")
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        run_bld(
            parent, VARIANTS, torch.ones(4, 100, dtype=torch.long), torch.ones(4, 100, dtype=torch.long), cfg, tmp_path
        )
    with pytest.raises(ConfigError, match="at least 2 calibration sequences"):
        run_bld(parent, VARIANTS, tokens[:1], tokens, cfg, tmp_path / "b")
    with pytest.raises(ConfigError, match="no 'input_ids' column"):
        run_bld(parent, VARIANTS, Dataset.from_dict({"text": ["a", "b"]}), tokens, cfg, tmp_path / "c")
    # a library of parent and no-op variants only needs no trainers (and no Ray)
    only_trivial = [{"attention": [AttentionConfig(no_op=True)], "ffn": [FFNConfig(no_op=True)]}] * 2
    rows = Dataset.from_dict({"input_ids": tokens[:8].tolist()})
    store = run_bld(parent, only_trivial, rows, [tokens[8:12], tokens[12:16]], cfg, tmp_path / "d")
    assert store.last_run["trained"] == [] and len(store.last_run["untrained"]) == 8
    assert store.index["layer_1"]["ffn"]["ffn_no_op"]["nmse_init"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------------------------
# On Ray
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def baseline(parent, tokens, tmp_path_factory, ray_session):
    """An uninterrupted decoupled BLD run, the reference for resume and restart."""
    return _run(parent, tokens, tmp_path_factory.mktemp("baseline"))


@pytest.mark.integration
def test_bld_lowers_every_trained_blocks_heldout_error(baseline):
    trained = 0
    for layer in ("layer_0", "layer_1"):
        kinds = baseline.index[layer]
        assert len(kinds["attention"]) + len(kinds["ffn"]) == 8  # m + n entries, no m x n pairs
        assert "block" not in kinds
        for kind, entries in kinds.items():
            for name, e in entries.items():
                if e["parent"]:
                    assert e["file"] is None and e["nmse_trained"] == 0.0
                elif name.endswith("no_op"):
                    assert e["file"] is None and e["tokens"] == 0
                else:
                    trained += 1
                    assert e["tokens"] == 12 * 4 * SEQ
                    assert e["nmse_trained"] < e["nmse_init"], f"{layer}/{kind}/{name}: {e}"
    assert trained == 8 and len(baseline.last_run["trained"]) == 8
    assert baseline.index["layer_0"]["ffn"]["ffn_no_op"]["nmse_init"] == pytest.approx(1.0)
    methods = {e["init"] for kinds in baseline.index.values() for es in kinds.values() for e in es.values()}
    assert {"kv_mean_pool", "linear_wo_wv", "channel_contribution", "lstsq", "parent", "no_op"} <= methods
    assert baseline.last_run["forward_seconds"] > 0 and baseline.last_run["trainer_seconds"] > 0


@pytest.mark.integration
def test_library_layers_carry_the_trained_weights(baseline, parent, tokens):
    block = BlockConfig(AttentionConfig(replace_with_linear=True), FFNConfig(intermediate_size=32))
    layer = baseline.build_layer(parent, 1, block)
    attn = load_file(str(baseline.root / baseline.index["layer_1"]["attention"]["attn_linear"]["file"]))
    ffn = load_file(str(baseline.root / baseline.index["layer_1"]["ffn"]["ffn_32"]["file"]))
    assert set(layer.state_dict()) == set(attn) | set(ffn)
    for name, value in {**attn, **ffn}.items():
        assert torch.equal(layer.state_dict()[name], value)
    states, _ = parent_activations(parent, tokens[:2])
    assert layer(states[1], position_embeddings(parent, SEQ)).shape == states[1].shape


SPACE = """\
attention:
  kv_heads: [1]
  no_op: true
ffn:
  fractions: {fractions}
  no_op: true
ffn_multiple_of: 8
"""


def _bld_job(tmp_path: Path):
    """The demo job shrunk by debug=default on a 2-layer tiny parent and a corpus of its words, up to bld."""
    import random

    from puzzle.config import load_job

    rng = random.Random(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(60):
        (corpus / f"doc{i:03d}.txt").write_text(" ".join(f"w{rng.randrange(4, 128)}" for _ in range(200)))
    for name, fractions in (("a", "[1.0, 0.5]"), ("b", "[1.0, 0.5, 0.25]")):
        (tmp_path / f"space_{name}.yaml").write_text(SPACE.format(fractions=fractions))
    overrides = [
        "parent=local", f"parent.path={save_tiny_parent(tmp_path)}", "parent.dtype=float32", "data=files",
        f"data.paths={corpus / '*.txt'}", "data.seq_len=16", "debug=default", "cluster.num_cpus=2",
        f"search_space.path={tmp_path / 'space_a.yaml'}", "run.name=bld",
    ]  # fmt: skip
    job = load_job("jobs/demo.yaml", overrides)
    job.run.runs_dir = str(tmp_path / "runs")
    return job


def _weights(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Each finished block's weights file in the run's block store: (inode, mtime), to see it was not rewritten."""
    return {
        p.parent.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (run_dir / "blocks").glob("*/*.safetensors")
    }


@pytest.mark.integration
def test_rerun_through_the_runner_trains_only_blocks_whose_key_is_new(tmp_path, ray_session):
    from puzzle.runner.run import run_job

    job = _bld_job(tmp_path)
    bld = job.run_dir / "stages" / "bld"

    def last_run() -> dict:
        return json.loads((bld / "store" / "last_run.json").read_text())

    run_job(job, until="bld")
    first = json.loads((bld / "manifest.json").read_text())
    assert sorted(last_run()["trained"]) == [
        "layer_0/attention/attn_group4", "layer_0/ffn/ffn_32", "layer_1/attention/attn_group4", "layer_1/ffn/ffn_32",
    ]  # fmt: skip
    trained = _weights(job.run_dir)
    assert len(trained) == 4

    # Resource-only keys: the stage is not even rerun.
    job.bld.num_workers, job.bld.checkpoint_every, job.bld.max_inflight_steps = 2, 1, 4
    run_job(job, until="bld")
    assert json.loads((bld / "manifest.json").read_text()) == first

    # One more FFN width: the stage reruns (its stage directory is rebuilt) and trains just that width's blocks.
    job.search_space.path = str(tmp_path / "space_b.yaml")
    run_job(job, until="bld")
    grown = json.loads((bld / "manifest.json").read_text())
    assert grown["input_hash"] != first["input_hash"] and grown["output_hash"] != first["output_hash"]
    assert sorted(last_run()["trained"]) == ["layer_0/ffn/ffn_16", "layer_1/ffn/ffn_16"]
    assert grown["summary"]["trained"] == 2 and grown["summary"]["cached"] == grown["summary"]["blocks"] - 2
    after = _weights(job.run_dir)
    assert {k: v for k, v in after.items() if k in trained} == trained and len(after) == 6  # old files untouched
    library = BlockStore(bld / "store")
    assert "ffn_16" in library.variants(0, "ffn")

    # Back to the first search space: every block is in the store, nothing trains, and the library is the first one.
    job.search_space.path = str(tmp_path / "space_a.yaml")
    run_job(job, until="bld")
    again = json.loads((bld / "manifest.json").read_text())
    assert last_run()["trained"] == [] and again["output_hash"] == first["output_hash"]
    assert "ffn_16" not in BlockStore(bld / "store").variants(0, "ffn")


@pytest.mark.integration
def test_interrupted_run_resumes_from_checkpoints_and_equals_uninterrupted(baseline, parent, tokens, tmp_path):
    class Interrupted(Exception):
        pass

    def interrupt(step, actors):
        if step == 10:
            raise Interrupted

    with pytest.raises(Interrupted):
        _run(parent, tokens, tmp_path / "lib", on_step=interrupt)
    assert list((tmp_path / "lib" / "work" / "checkpoints").glob("*.safetensors"))
    resumed = _run(parent, tokens, tmp_path / "lib")
    start = resumed.last_run["start_step"]
    # Checkpoints fall due every 3 steps and are fetched a block at a time, from a trainer that may have gone on by
    # the steps in flight: each records the step it holds, and the run resumes from the earliest.
    steps = set(resumed.last_run["resumed_from"].values())
    assert start > 1 and min(steps) == start - 1 and max(steps) <= start - 1 + CFG.get("max_inflight_steps", 2)
    _assert_same_library(baseline, resumed)
    assert not list((tmp_path / "lib" / "work" / "checkpoints").glob("*.safetensors"))


@pytest.mark.integration
def test_killed_trainer_is_restarted_and_its_blocks_finish_identically(baseline, parent, tokens, tmp_path):
    import ray

    killed = []

    def kill(step, actors):
        if step == 8:
            ray.kill(actors[0], no_restart=False)  # Ray restarts it (max_restarts); its blocks replay from step 6
            killed.append(step)

    store = _run(parent, tokens, tmp_path / "lib", on_step=kill)
    assert killed == [8]
    assert store.last_run["replayed_steps"] > 0
    _assert_same_library(baseline, store)


@pytest.mark.integration
def test_coupled_mode_trains_pairs(parent, tokens, tmp_path, ray_session):
    variants = [
        {"blocks": [BlockConfig(AttentionConfig(replace_with_linear=True), FFNConfig(intermediate_size=32))]}
    ] * 2
    store = _run(parent, tokens, tmp_path / "lib", variants=variants, cfg={"mode": "coupled", "tokens": 4 * 4 * SEQ})
    entry = store.index["layer_0"]["block"]["attn_linear+ffn_32"]
    assert entry["init"] == "linear_wo_wv+channel_contribution"
    assert entry["nmse_trained"] < entry["nmse_init"]
    assert store.index["layer_0"]["block"]["attn_group2+ffn_64"]["parent"]
    block = BlockConfig(AttentionConfig(replace_with_linear=True), FFNConfig(intermediate_size=32))
    layer = store.build_layer(parent, 0, block)
    for name, value in load_file(str(store.root / entry["file"])).items():
        assert torch.equal(layer.state_dict()[name], value)


@pytest.mark.integration
def test_gpu_request_on_a_cpu_cluster_is_refused(parent, tokens, tmp_path, ray_session):
    with pytest.raises(ConfigError, match="num_gpus"):
        _run(parent, tokens, tmp_path / "lib", cfg={"num_gpus": 0.5})


def test_train_rows_are_read_from_the_split_on_demand_with_the_tensors_fingerprint(tmp_path):
    """A packed split is wrapped, not loaded: batches come from disk, and its fingerprint equals the tensor's."""
    import datasets

    from puzzle.common.rows import TokenRows

    rows = torch.randint(0, 100, (10, 6), generator=torch.Generator().manual_seed(0))
    datasets.Dataset.from_dict({"input_ids": rows.tolist()}).save_to_disk(str(tmp_path / "split"))
    wrapped = TokenRows(datasets.load_from_disk(str(tmp_path / "split")), "train")
    assert wrapped.shape == (10, 6) and wrapped._tensor is None
    assert torch.equal(wrapped[torch.tensor([7, 2])], rows[[7, 2]])
    assert wrapped.min_max() == (int(rows.min()), int(rows.max()))
    assert tokens_fingerprint(wrapped) == tokens_fingerprint(rows) == tokens_fingerprint(TokenRows(rows))
