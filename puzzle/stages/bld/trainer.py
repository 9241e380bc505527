"""The `BlockTrainer` Ray actor: owns the blocks of one or more layers, builds them from streamed calibration sums,
trains them on streamed parent activations and scores them on streamed held-out batches.

Everything data-sized arrives one batch at a time (object-store references the driver puts once per batch), so an
actor's memory is its blocks, their optimizer state and its layers' calibration sums, whatever the token budgets.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from puzzle.common.memory import trim_heap
from puzzle.common.seeding import derive_seed, seed_everything
from puzzle.config import BLDConfig
from puzzle.stages.bld.init import FFNStats
from puzzle.stages.bld.plan import BlockSpec
from puzzle.stages.bld.train import BlockRun, block_output, initial_layer


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
        layers = sorted({s.layer for s in specs})
        self.parent_states = dict(zip(layers, ray.get([payload["layers"][i] for i in layers]), strict=True))
        self.pos = ray.get(payload["pos"])
        self.stats = {i: FFNStats(linear) for i, linear in calibration_layers(specs).items()}
        self.calibrated = 0
        self.runs: dict[str, BlockRun] = {}
        self.sums: dict[str, HeldoutSums] = {}

    def node_id(self) -> str:
        """The Ray node this trainer runs on (recorded in the run's record)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    # ----------------------------------------------------------------------------------------------- preparing

    def calibrate(self, index: int, mids: dict[int, Any]) -> bool:
        """Add calibration batch `index` (the FFN inputs of this actor's calibration layers); False if out of order
        (the actor was restarted part-way: the driver starts its calibration again)."""
        import ray

        if index != self.calibrated:
            return False
        keys = sorted(mids)
        for i, mid in zip(keys, ray.get([mids[i] for i in keys]), strict=True):
            self.stats[i].add_hidden(self.parent_states[i], self.config, mid)
        self.calibrated += 1
        return True

    def build(self, checkpoints: dict[str, Any], calibration_batches: int) -> dict[str, int] | None:
        """Initialise every block from the parent and the calibration sums, then restore `checkpoints` (hash -> ref);
        None if this actor did not see all `calibration_batches` (restarted since)."""
        import ray

        if self.calibrated != calibration_batches:
            return None
        self.runs = {}
        shared: dict[int, torch.nn.Module] = {}
        for spec in self.specs:
            start = time.perf_counter()
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
        return self.steps()

    def steps(self) -> dict[str, int]:
        return {h: run.step for h, run in self.runs.items()}

    # ----------------------------------------------------------------------------------------------- held-out

    def _heldout_runs(self, phase: str) -> list[BlockRun] | None:
        if not self.runs:
            return None
        if phase == "init":
            return [run for run in self.runs.values() if "nmse_init" not in run.meta]
        if min(run.step for run in self.runs.values()) < self.total_steps:
            return None
        return list(self.runs.values())

    def heldout_needed(self, phase: str) -> bool:
        return bool(self._heldout_runs(phase))

    def heldout_step(self, phase: str, acts: dict[int, dict[str, Any]]) -> dict[str, Any]:
        """Add one held-out batch to the normalised-MSE sums of phase "init" (blocks as initialised) or "final"."""
        runs = self._heldout_runs(phase)
        if runs is None:
            return {"status": "need_replay"}
        sums = self.sums.setdefault(phase, HeldoutSums())
        fetched = self._fetch(runs, acts)
        for run in runs:
            x, target = fetched[(run.spec.layer, run.spec.input_kind)], fetched[(run.spec.layer, "out")]
            sums.add(run.spec.hash, run.layer, run.spec, x, target, self.pos)
        return {"status": "ok"}

    def heldout_done(self, phase: str) -> bool:
        """Close a pass; False if this actor missed part of it (restarted). Phase "init" puts each block's initial
        normalised MSE into its meta (and so into its checkpoints); "final" sums stay for `finish`."""
        runs = self._heldout_runs(phase)
        sums = self.sums.pop(phase, None) if phase == "init" else self.sums.get(phase)
        if runs is None or (runs and (sums is None or any(r.spec.hash not in sums.err for r in runs))):
            return False
        if phase == "init":
            for run in runs:
                run.meta["nmse_init"] = sums.nmse(run.spec.hash)
        return True

    # ----------------------------------------------------------------------------------------------- training

    @staticmethod
    def _fetch(runs: list[BlockRun], acts: dict[int, dict[str, Any]]) -> dict[tuple[int, str], Tensor]:
        import ray

        keys = sorted({(r.spec.layer, k) for r in runs for k in (r.spec.input_kind, "out")})
        return dict(zip(keys, ray.get([acts[layer][kind] for layer, kind in keys]), strict=True))

    def train_step(self, step: int, acts: dict[int, dict[str, Any]]) -> dict[str, Any]:
        """Apply `step` to every block that reached step - 1; blocks already past it skip it (resumed runs)."""
        if not self.runs or min(run.step for run in self.runs.values()) < step - 1:
            return {"status": "need_replay"}
        todo = [run for run in self.runs.values() if run.step == step - 1]
        fetched = self._fetch(todo, acts)
        start = time.perf_counter()
        losses = {}
        for run in todo:
            x, target = fetched[(run.spec.layer, run.spec.input_kind)], fetched[(run.spec.layer, "out")]
            losses[run.spec.hash] = run.train_step(step, x, target, self.pos)
        del fetched
        trim_heap()  # the backward passes' freed buffers go back to the OS, not into a growing heap
        result = {"status": "ok", "losses": losses, "seconds": time.perf_counter() - start}
        every = self.cfg.checkpoint_every
        if every and step % every == 0 and step < self.total_steps:
            result["checkpoints"] = {run.spec.hash: run.checkpoint() for run in todo}
        return result

    def finish(self) -> dict[str, Any]:
        """Final weights and held-out scores of every block, once all reached the last step and were scored."""
        if self._heldout_runs("final") is None:
            return {"status": "need_replay"}
        sums = self.sums.get("final")
        if sums is None or any(h not in sums.err for h in self.runs):
            return {"status": "need_heldout"}
        blocks = {}
        for h, run in self.runs.items():
            blocks[h] = {
                "state": run.saved_state(self.save_dtype),
                "init": run.meta["init"],
                "nmse_init": float(run.meta["nmse_init"]),
                "nmse_trained": sums.nmse(h),
                "seconds": run.seconds,
                "train_loss": run.last_loss,
            }
        return {"status": "ok", "blocks": blocks}
