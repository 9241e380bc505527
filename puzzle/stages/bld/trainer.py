"""The `BlockTrainer` Ray actor: owns the blocks of a run of consecutive layers, builds them from calibration sums,
trains them and scores them on held-out batches.

The trainer runs the parent itself: it is sent the parent's embedding and layers up to its last one once, and then
only token ids, one batch at a time; it makes its layers' inputs and targets on its own device (`ParentPrefix`). An
actor's memory is that prefix, its blocks, their optimizer state, its layers' calibration sums and one batch's
activations, whatever the token budgets; the driver holds no activation at all.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from puzzle.common.memory import trim_heap
from puzzle.common.seeding import derive_seed, seed_everything
from puzzle.config import BLDConfig
from puzzle.model.packing import packed_state
from puzzle.stages.bld.init import FFNStats
from puzzle.stages.bld.plan import BlockSpec
from puzzle.stages.bld.store import layer_weights
from puzzle.stages.bld.train import BlockRun, ParentPrefix, block_output, initial_layer, untrained_init, untrained_layer


def calibration_layers(specs: list[BlockSpec]) -> dict[int, bool]:
    """{layer: needs least-squares sums} for the layers whose FFN variants are initialised from calibration data."""
    out: dict[int, bool] = {}
    for s in specs:
        if s.trainable and s.kind != "attention" and not s.ffn.no_op:
            out[s.layer] = out.get(s.layer, False) or s.ffn.replace_with_linear
    return out


class HeldoutSums:
    """Numerator and denominator of each block's normalised MSE, summed over held-out batches in float64."""

    def __init__(self) -> None:
        self.err: dict[str, float] = {}
        self.ref: dict[str, float] = {}

    @torch.no_grad()
    def add(self, key: str, layer, spec: BlockSpec, x: Tensor, target: Tensor, pos) -> None:
        params = list(layer.parameters())
        dtype, device = (params[0].dtype, params[0].device) if params else (target.dtype, target.device)
        x, target = x.to(device, dtype), target.to(device, dtype)
        out = block_output(layer, spec, x, tuple(p.to(device, dtype) for p in pos))
        self.err[key] = self.err.get(key, 0.0) + (out - target).double().pow(2).sum().item()
        self.ref[key] = self.ref.get(key, 0.0) + (target - x).double().pow(2).sum().item()

    def nmse(self, key: str) -> float:
        return self.err[key] / max(self.ref[key], 1e-30)


class BlockTrainer:
    """Ray actor that owns the blocks of one or more layers.

    Life: `calibrate` (calibration batches, in order) -> `build` (blocks initialised, checkpoints restored) ->
    `heldout_step("init", ...)` + `heldout_done("init")` -> `train_step` per step -> `heldout_step("final", ...)` ->
    `finish`. Each block remembers the step it reached. A restarted actor (Ray re-runs __init__) has no blocks: any
    call then answers {"status": "need_replay"} and the driver prepares it again (calibration, checkpoints, replay).
    """

    def __init__(
        self,
        config,
        specs: list[BlockSpec],
        payload: dict[str, Any],
        cfg: BLDConfig,
        total_steps: int,
        save_dtype: str = "float32",
    ) -> None:
        import ray

        torch.set_num_threads(max(1, int(cfg.num_cpus)))
        self.cfg, self.total_steps, self.config, self.specs = cfg, total_steps, config, specs
        self.save_dtype = getattr(torch, save_dtype)
        self.device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.last_layer = max(s.layer for s in specs)
        state = packed_state(ray.get(payload["parent"]))  # views of the object store's copy, shared on the node
        states = [layer_weights(state, i) for i in range(self.last_layer + 1)]
        embed, pos = state["model.embed_tokens.weight"], ray.get(payload["pos"])
        self.parent = ParentPrefix(config, embed, states, pos, self.device)
        del state
        self.parent_states = {s.layer: self.parent.layers[s.layer].state_dict() for s in specs}
        self.pos = self.parent.pos
        self.stats = {i: FFNStats(linear) for i, linear in calibration_layers(specs).items()}
        self.calibrated = 0
        self.built = False
        self.runs: dict[str, BlockRun] = {}
        self.untrained = {s.hash for s in specs if not s.trainable}  # no-op variants: scored once, never trained
        self.frozen: dict[str, torch.nn.Module] = {}  # their layers, until scored (then dropped)
        self.frozen_nmse: dict[str, float] = {}
        self.sums: dict[str, HeldoutSums] = {}

    def _activations(self, rows: Tensor, specs: list[BlockSpec]) -> dict[tuple[int, str], Tensor]:
        """{(layer, "h" | "mid" | "out"): tensor} for `specs` on token rows: one parent pass up to their last layer."""
        upto = max(s.layer for s in specs) + 1
        states, mids = self.parent.activations(rows, upto)
        out = {}
        for s in specs:
            out[(s.layer, s.input_kind)] = mids[s.layer] if s.kind == "ffn" else states[s.layer]
            out[(s.layer, "out")] = states[s.layer + 1]
        return out

    def node_id(self) -> str:
        """The Ray node this trainer runs on (recorded in the run's record)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    # ----------------------------------------------------------------------------------------------- preparing

    def calibrate(self, index: int, rows: Tensor) -> bool:
        """Add calibration batch `index` (token rows) to this actor's calibration layers' sums; False if out of order
        (the actor was restarted part-way: the driver starts its calibration again)."""
        if index != self.calibrated:
            return False
        if self.stats:
            _, mids = self.parent.activations(rows, max(self.stats) + 1)
            for i, stats in self.stats.items():
                stats.add_hidden(self.parent_states[i], self.config, mids[i])
        self.calibrated += 1
        return True

    def build(self, checkpoints: dict[str, Any], calibration_batches: int) -> dict[str, int] | None:
        """Initialise every block from the parent and the calibration sums, then restore `checkpoints` (hash -> ref);
        None if this actor did not see all `calibration_batches` (restarted since)."""
        import ray

        if self.calibrated != calibration_batches:
            return None
        self.runs, self.frozen = {}, {}
        shared: dict[int, torch.nn.Module] = {}
        for spec in self.specs:
            start = time.perf_counter()
            if not spec.trainable:
                if spec.hash in self.frozen_nmse:
                    continue
                self.frozen[spec.hash] = untrained_layer(spec, self.config, self.parent_states[spec.layer]).to(
                    self.device
                )
                continue
            # Seeded from the block's own key (which holds cfg.seed), not the actor's: a block is built alike whichever
            # trainer gets it and whatever else that trainer holds. Training draws no random numbers (the data order
            # is batch_rows's), so a block's weights depend on its key alone.
            seed_everything(derive_seed(self.cfg.seed, "block", spec.hash))
            layer, init = initial_layer(spec, self.config, self.parent_states[spec.layer], self.stats.get(spec.layer))
            run = BlockRun(spec, layer, self.cfg, self.total_steps, self.device)
            if spec.kind == "attention":  # the frozen parent FFN after each attention variant: one copy per layer
                first = shared.setdefault(spec.layer, run.layer)
                run.layer.post_attention_layernorm = first.post_attention_layernorm
                run.layer.mlp = first.mlp
            run.meta["init"] = init
            run.seconds += time.perf_counter() - start
            ref = checkpoints.get(spec.hash)
            if ref is not None:
                run.restore(ray.get(ref))
            self.runs[spec.hash] = run
        self.stats = {}  # initialisation is done; the sums are not needed again
        self.built = True
        return self.steps()

    def steps(self) -> dict[str, int]:
        """The step each trained block reached (untrained blocks count as finished)."""
        return {h: run.step for h, run in self.runs.items()} | dict.fromkeys(self.untrained, self.total_steps)

    # ----------------------------------------------------------------------------------------------- held-out

    def _heldout_blocks(self, phase: str) -> list[tuple[BlockSpec, torch.nn.Module]] | None:
        """(spec, layer) of the blocks phase "init" or "final" scores; None if the actor cannot (restarted, or not
        every block reached the last step for "final")."""
        if not self.built:
            return None
        by_hash = {s.hash: s for s in self.specs}
        if phase == "init":
            runs = [(run.spec, run.layer) for run in self.runs.values() if "nmse_init" not in run.meta]
            return runs + [(by_hash[h], layer) for h, layer in self.frozen.items() if h not in self.frozen_nmse]
        if self.runs and min(run.step for run in self.runs.values()) < self.total_steps:
            return None
        return [(run.spec, run.layer) for run in self.runs.values()]

    def heldout_needed(self, phase: str) -> bool:
        return bool(self._heldout_blocks(phase))

    def heldout_step(self, phase: str, rows: Tensor) -> dict[str, Any]:
        """Add one held-out batch (token rows) to the normalised-MSE sums of phase "init" (blocks as initialised,
        untrained blocks included) or "final"."""
        blocks = self._heldout_blocks(phase)
        if blocks is None:
            return {"status": "need_replay"}
        sums = self.sums.setdefault(phase, HeldoutSums())
        if blocks:
            acts = self._activations(rows, [spec for spec, _ in blocks])
            for spec, layer in blocks:
                x, target = acts[(spec.layer, spec.input_kind)], acts[(spec.layer, "out")]
                sums.add(spec.hash, layer, spec, x, target, self.pos)
        return {"status": "ok"}

    def heldout_done(self, phase: str) -> bool:
        """Close a pass; False if this actor missed part of it (restarted). Phase "init" puts each block's initial
        normalised MSE into its meta (and so into its checkpoints) and scores the untrained blocks for good; "final"
        sums stay for `finish`."""
        blocks = self._heldout_blocks(phase)
        sums = self.sums.pop(phase, None) if phase == "init" else self.sums.get(phase)
        if blocks is None or (blocks and (sums is None or any(spec.hash not in sums.err for spec, _ in blocks))):
            return False
        if phase == "init":
            for spec, _ in blocks:
                if spec.hash in self.runs:
                    self.runs[spec.hash].meta["nmse_init"] = sums.nmse(spec.hash)
                else:
                    self.frozen_nmse[spec.hash] = sums.nmse(spec.hash)
                    del self.frozen[spec.hash]  # scored for good: its layer is not needed again
        return True

    # ----------------------------------------------------------------------------------------------- training

    def train_step(self, step: int, rows: Tensor) -> dict[str, Any]:
        """Apply `step` (its token rows) to every block that reached step - 1; blocks already past it skip it
        (resumed runs)."""
        if not self.built or (self.runs and min(run.step for run in self.runs.values()) < step - 1):
            return {"status": "need_replay"}
        todo = [run for run in self.runs.values() if run.step == step - 1]
        start = time.perf_counter()
        losses, forward = {}, 0.0
        if todo:
            acts = self._activations(rows, [run.spec for run in todo])
            forward = time.perf_counter() - start
            for run in todo:
                x, target = acts[(run.spec.layer, run.spec.input_kind)], acts[(run.spec.layer, "out")]
                losses[run.spec.hash] = run.train_step(step, x, target, self.pos)
            del acts
        trim_heap()  # the backward passes' freed buffers go back to the OS, not into a growing heap
        result = {"status": "ok", "losses": losses, "seconds": time.perf_counter() - start, "forward_seconds": forward}
        every = self.cfg.checkpoint_every
        if every and step % every == 0 and step < self.total_steps:
            result["checkpoint_due"] = [run.spec.hash for run in todo]  # the driver fetches them one at a time
        return result

    def block_checkpoint(self, block_hash: str) -> dict[str, Any] | None:
        """One block's checkpoint as it is now (its meta holds the step it reached), None if this actor lost it."""
        run = self.runs.get(block_hash)
        return None if run is None else run.checkpoint()

    def block_state(self, block_hash: str) -> dict[str, Tensor] | None:
        """One finished block's weights to store (after `finish` answered ok), None if this actor lost it."""
        run = self.runs.get(block_hash)
        return None if run is None or run.step < self.total_steps else run.saved_state(self.save_dtype)

    def finish(self) -> dict[str, Any]:
        """Final weights and held-out scores of every block, once all reached the last step and were scored."""
        if self._heldout_blocks("final") is None:
            return {"status": "need_replay"}
        sums = self.sums.get("final")
        if (self.runs and sums is None) or any(h not in sums.err for h in self.runs):
            return {"status": "need_heldout"}
        if any(h not in self.frozen_nmse for h in self.untrained):
            return {"status": "need_replay"}
        blocks = {}
        for h, run in self.runs.items():
            blocks[h] = {  # weights stay here until the driver fetches them a block at a time (`block_state`)
                "init": run.meta["init"],
                "nmse_init": float(run.meta["nmse_init"]),
                "nmse_trained": sums.nmse(h),
                "seconds": run.seconds,
                "train_loss": run.last_loss,
            }
        for spec in self.specs:
            if spec.hash in self.untrained:
                nmse = self.frozen_nmse[spec.hash]
                blocks[spec.hash] = {"init": untrained_init(spec), "nmse_init": nmse, "untrained": True}
                blocks[spec.hash].update({"nmse_trained": nmse, "seconds": 0.0, "train_loss": float("nan")})
        return {"status": "ok", "blocks": blocks}
