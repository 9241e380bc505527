"""One BLD run on Ray, seen from the driver: token batches streamed to `BlockTrainer` actors (calibration, held-out
and training batches alike), recovery of restarted actors, and bookkeeping.

Each trainer runs the parent's layers up to its last one itself, where it runs (`ParentPrefix`): the driver sends the
parent's weights into the object store once and then only token ids, at most `bld.max_inflight_steps` batches ahead
of the slowest trainer. It holds no activations.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from puzzle.common.memory import trim_heap
from puzzle.config import BLDConfig
from puzzle.errors import PuzzleError
from puzzle.stages.bld.plan import BlockSpec, assign_blocks
from puzzle.stages.bld.train import load_checkpoint, save_checkpoint
from puzzle.stages.bld.trainer import BlockTrainer, calibration_layers


def batch_rows(step: int, n_rows: int, batch_size: int, seed: int) -> Tensor:
    """Rows of 1-based training `step`: a fixed stream of per-epoch permutations, independent of anything else."""
    from puzzle.common.rows import shuffled_rows

    return shuffled_rows((step - 1) * batch_size, batch_size, n_rows, seed, seed_stride=1_000_003)


@dataclass
class TrainSession:
    """Driver state of one BLD run on Ray: trainers, the token stream, recovery and bookkeeping."""

    config: Any
    specs: list[BlockSpec]
    cfg: BLDConfig
    total_steps: int
    train_rows: Any  # TokenRows: [rows, seq] read on demand
    calib_rows: Tensor
    heldout_rows: Tensor
    work_dir: Path
    logger: Any = None
    on_step: Callable[[int, list], None] | None = None
    actors: list = field(default_factory=list)
    groups: list[list[BlockSpec]] = field(default_factory=list)
    last_submitted: int = 0
    forward_seconds: float = 0.0
    trainer_seconds: float = 0.0
    replayed_steps: int = 0
    sent_bytes: int = 0
    max_step_bytes: int = 0
    prepared: int = 0
    nodes: list[str] = field(default_factory=list)

    def checkpoint_path(self, block_hash_: str) -> Path:
        return self.work_dir / "checkpoints" / f"{block_hash_}.safetensors"

    # ------------------------------------------------------------------------------------------ the token stream

    def _send(self, rows: Tensor, actors: int) -> Tensor:
        """Count what goes to `actors` trainers for one batch: its token ids, once per trainer."""
        size = rows.numel() * rows.element_size() * actors
        self.sent_bytes += size
        self.max_step_bytes = max(self.max_step_bytes, size)
        return rows

    def step_rows(self, step: int, actors: int = 1) -> Tensor:
        rows = batch_rows(step, self.train_rows.shape[0], self.cfg.batch_size, self.cfg.seed)
        return self._send(self.train_rows[rows], actors)

    def _specs(self, ais: list[int] | None) -> list[BlockSpec]:
        return self.specs if ais is None else [s for ai in ais for s in self.groups[ai]]

    def _batches(self, rows: Tensor):
        for start in range(0, rows.shape[0], self.cfg.batch_size):
            yield rows[start : start + self.cfg.batch_size]

    def _bounded(self, submit: Callable[[Tensor], dict[int, Any]], rows: Tensor) -> dict[int, list]:
        """Submit one call per batch of `rows` (`submit` returns {actor: ref}), at most max_inflight_steps batches
        ahead; returns every actor's results in order."""
        import ray

        inflight: deque = deque()
        results: dict[int, list] = {}

        def drain_one() -> None:
            for ai, ref in inflight.popleft().items():
                results.setdefault(ai, []).append(ray.get(ref))

        for batch in self._batches(rows):
            inflight.append(submit(batch))
            while len(inflight) > self.cfg.max_inflight_steps:
                drain_one()
        while inflight:
            drain_one()
        return results

    # ------------------------------------------------------------------------------------------ preparing actors

    def start(self, checkpoints: dict[str, Any], save_dtype: str, payload: dict[str, Any]) -> int:
        """Create the trainers and prepare them; returns the first step to stream (after their checkpoints)."""
        import ray

        trainer = ray.remote(BlockTrainer).options(
            num_cpus=self.cfg.num_cpus,
            num_gpus=self.cfg.num_gpus,
            max_restarts=self.cfg.max_restarts,
            max_task_retries=-1 if self.cfg.max_restarts else 0,
        )
        self.groups = assign_blocks(self.specs, self.config, self.cfg.num_workers)
        self.actors = [
            trainer.remote(self.config, group, payload, self.cfg, self.total_steps, save_dtype) for group in self.groups
        ]
        self.nodes = ray.get([actor.node_id.remote() for actor in self.actors])
        steps = self.prepare(list(range(len(self.actors))), checkpoints)
        return min(min(s.values()) for s in steps.values()) + 1

    def prepare(self, ais: list[int], checkpoints: dict[str, Any], attempts: int = 0) -> dict[int, dict[str, int]]:
        """Calibrate, build (restoring `checkpoints`, hash -> ref) and score-as-initialised actors `ais`; an actor
        restarted meanwhile is prepared again. Returns each actor's steps reached."""
        import ray

        if attempts > self.cfg.max_restarts + 1:
            raise PuzzleError(f"BLD trainers {ais} kept dying while being prepared; see the Ray worker logs")
        self.prepared += 1
        calib = {ai: sorted(calibration_layers(self.groups[ai])) for ai in ais}
        calib = {ai: layers for ai, layers in calib.items() if layers}
        batches = 0
        if calib:
            index = itertools.count()

            def submit(rows: Tensor) -> dict[int, Any]:
                rows, k = self._send(rows, len(calib)), next(index)
                return {ai: self.actors[ai].calibrate.remote(k, rows) for ai in calib}

            answers = self._bounded(submit, self.calib_rows)
            batches = len(next(iter(answers.values())))  # every calibrating actor got each batch
        results = ray.get(
            [
                self.actors[ai].build.remote(
                    {s.hash: checkpoints[s.hash] for s in self.groups[ai] if s.hash in checkpoints},
                    batches if ai in calib else 0,
                )
                for ai in ais
            ]
        )
        steps = {ai: r for ai, r in zip(ais, results, strict=True) if r is not None}
        again = [ai for ai in ais if ai not in steps]
        if again:  # restarted during calibration
            steps.update(self.prepare(again, checkpoints, attempts + 1))
        failed = self.heldout_pass("init", [ai for ai in ais if ai not in again])
        if failed:
            steps.update(self.prepare(failed, self._disk_checkpoints(failed), attempts + 1))
        return steps

    def heldout_pass(self, phase: str, ais: list[int]) -> list[int]:
        """Stream the held-out batches to actors `ais` for phase "init" or "final"; returns the actors that were
        restarted meanwhile (their sums are lost)."""
        import ray

        needed = ray.get([self.actors[ai].heldout_needed.remote(phase) for ai in ais])
        ais = [ai for ai, need in zip(ais, needed, strict=True) if need or phase == "final"]
        if not ais:
            return []

        def submit(rows: Tensor) -> dict[int, Any]:
            rows = self._send(rows, len(ais))
            return {ai: self.actors[ai].heldout_step.remote(phase, rows) for ai in ais}

        results = self._bounded(submit, self.heldout_rows)
        bad = {ai for ai, rs in results.items() if any(r["status"] != "ok" for r in rs)}
        done = ray.get([self.actors[ai].heldout_done.remote(phase) for ai in ais if ai not in bad])
        ok = [ai for ai in ais if ai not in bad]
        bad |= {ai for ai, d in zip(ok, done, strict=True) if not d}
        return sorted(bad)

    def _disk_checkpoints(self, ais: list[int]) -> dict[str, Any]:
        import ray

        out = {}
        for spec in self._specs(ais):
            ckpt = load_checkpoint(self.checkpoint_path(spec.hash))
            if ckpt is not None:
                out[spec.hash] = ray.put(ckpt)
        return out

    # ------------------------------------------------------------------------------------------ training

    def handle(self, ai: int, step: int, result: dict[str, Any]) -> None:
        import ray

        self.trainer_seconds += result["seconds"]
        self.forward_seconds += result["forward_seconds"]
        # Checkpoints come one block at a time, so the driver never holds more than one block's weights and AdamW
        # state. The actor may be a step or two further by now: each checkpoint records the step it holds.
        for h in result.get("checkpoint_due", []):
            ckpt = ray.get(self.actors[ai].block_checkpoint.remote(h))
            if ckpt is not None:  # None: restarted since; the next call finds out and replays
                save_checkpoint(self.checkpoint_path(h), ckpt)
            del ckpt
            trim_heap()
        if self.logger is not None and result["losses"]:
            by_hash = {s.hash: s for s in self.groups[ai]}
            metrics = {}
            for h, loss in result["losses"].items():
                spec = by_hash[h]
                metrics[f"bld/layer_{spec.layer}/{spec.kind}/{spec.name}/loss"] = loss
            self.logger.log(metrics, step=step)

    def collect(self, entry: tuple[int, dict[int, Any]], inflight: deque) -> None:
        import ray

        step, futures = entry
        if not futures:
            return
        ray.wait(list(futures.values()), num_returns=len(futures))
        for ai, ref in futures.items():
            result = ray.get(ref)  # already finished (waited on above)
            if result["status"] == "need_replay":
                self.recover(ai, inflight)
            else:
                self.handle(ai, step, result)

    def recover(self, ai: int, inflight: deque) -> None:
        """Trainer `ai` was restarted and lost its blocks: prepare it again from its checkpoints, replay the steps."""
        import ray

        for step, futures in inflight:  # its later calls ran on the fresh actor too: drain them first
            ref = futures.pop(ai, None)
            if ref is not None:
                result = ray.get(ref)
                if result["status"] == "ok":
                    self.handle(ai, step, result)
        reached = min(self.prepare([ai], self._disk_checkpoints([ai]))[ai].values())
        actor = self.actors[ai]
        window = self.cfg.max_inflight_steps
        for first in range(reached + 1, self.last_submitted + 1, window):
            steps = range(first, min(first + window, self.last_submitted + 1))
            futures = [actor.train_step.remote(k, self.step_rows(k)) for k in steps]
            results = ray.get(futures)
            self.replayed_steps += len(steps)
            if any(r["status"] == "need_replay" for r in results):
                return self.recover(ai, deque())  # it died again while replaying
            for k, result in zip(steps, results, strict=True):
                self.handle(ai, k, result)
        return None

    def stream(self, first_step: int, bar) -> None:
        inflight: deque = deque()
        tokens_per_step = self.cfg.batch_size * self.train_rows.shape[1]
        for step in range(first_step, self.total_steps + 1):
            rows = self.step_rows(step, len(self.actors))
            futures = {ai: actor.train_step.remote(step, rows) for ai, actor in enumerate(self.actors)}
            inflight.append((step, futures))
            self.last_submitted = step
            if self.on_step is not None:
                self.on_step(step, self.actors)
            while len(inflight) > self.cfg.max_inflight_steps:
                self.collect(inflight.popleft(), inflight)
                bar.update(tokens_per_step)
        while inflight:
            self.collect(inflight.popleft(), inflight)
            bar.update(tokens_per_step)

    def finish(self, write: Callable[[str, dict[str, Any], Any], None]) -> int:
        """Score every block after training and hand each to `write(hash, record, weights)` (weights None for an
        untrained block), fetching the weights a block at a time; trainers that die meanwhile are recovered. Returns
        the number of blocks written."""
        import ray

        pending = list(range(len(self.actors)))
        written = 0
        while pending:
            for ai in self.heldout_pass("final", pending):
                self.recover(ai, deque())
            results = ray.get([self.actors[ai].finish.remote() for ai in pending])
            again = []
            for ai, result in zip(pending, results, strict=True):
                if result["status"] == "ok" and self._write_blocks(ai, result["blocks"], write):
                    written += len(result["blocks"])
                    continue
                if result["status"] in ("ok", "need_replay"):  # "ok" here: it died while its blocks were fetched
                    self.recover(ai, deque())
                again.append(ai)
            pending = again
        return written

    def _write_blocks(self, ai: int, blocks: dict[str, dict[str, Any]], write) -> bool:
        """Fetch and write trainer `ai`'s finished blocks one at a time; False if it lost them (restarted)."""
        import ray

        for h, record in blocks.items():
            state = None
            if not record.get("untrained"):
                state = ray.get(self.actors[ai].block_state.remote(h))
                if state is None:
                    return False
            write(h, record, state)
            del state
            trim_heap()
        return True

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
