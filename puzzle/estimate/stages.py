"""The work of each stage of a job (`StageWork`), counted as the stage's code does it. One builder per stage; each
docstring says which code it follows and what it leaves out."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from puzzle.estimate.work import (
    ADAM_BYTES,
    NOOP,
    Lane,
    Pass,
    StageWork,
    block_activation_bytes,
    block_flops,
    block_params,
    ceil_div,
    decode_step,
    fixed_params,
    forward,
    head_activation_bytes,
    head_flops,
    model_flops,
    optimizer_step,
    parent_blocks,
    train,
    vocab,
)
from puzzle.model.block_config import BlockConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GLIBC_MMAP_MAX = 32 * 2**20
"""glibc's largest dynamic mmap threshold (64-bit): a freed block below it may stay in the process's heap."""
CHUNK = 1024
"""Positions per [positions, vocab] chunk of the scoring metrics and the GKD loss (their code's default)."""
RAY_TRAIN_HELPER_ACTORS = 5
"""Actors a Ray Train run starts beside its controller and workers, each importing only Ray: with ray 2.60, a
SynchronizationActor, a DatasetManager, a PreemptionWatcher, an _AutoscalingCoordinatorActor and a
PlacementGroupCleaner (0.11-0.12 GiB PSS each in the SmolLM2 job's GKD here)."""


@dataclass
class JobShape:
    """What the counting needs to know about a job: its config, the parent's (PuzzleConfig), the search space's
    variants per layer, the stand-in child, the machine's capacity and what is cached already."""

    job: Any
    config: Any
    variants: list[dict[str, list]]
    """Per layer {"attention": [...], "ffn": [...]} (puzzle.stages.bld.plan.variants_from_search_space)."""
    blocks: list[list[BlockConfig]]
    """Per layer every (attention, FFN) block of the search space, the parent's first."""
    child: list[BlockConfig]
    cpus: int
    gpus: int
    gpu: bool
    parent_cached: bool
    parent_source: str
    """"default" (puzzle trains it), "gguf" (imported) or "path"."""

    llc_bytes: int = 32 * 2**20
    """The last-level cache in front of the device's memory (the profiler flushes twice its size per timed step)."""
    device_memory_bytes: float = 0.0
    """The device's memory (a GPU's: the profiler keeps 30 % of it in block models at a time)."""

    def flush_bytes(self, batch: int) -> float:
        """Bytes a timed step's cache flush moves (profiling.flush; "auto": when the parent outgrows the cache): a
        buffer of twice the cache (at most profiling.flush_mib) read and written."""
        from puzzle.stages.profile.blocks import working_set_bytes

        mode = self.job.profiling.flush
        if mode == "auto":
            on = working_set_bytes(self.config, batch, self.job.target.context_len, self.elem) > self.llc_bytes
        else:
            on = mode == "always"
        buffer = 2.0 * self.llc_bytes
        if self.job.profiling.flush_mib is not None:
            buffer = min(buffer, self.job.profiling.flush_mib * 2**20)
        return 2.0 * buffer if on else 0.0

    @property
    def seq_len(self) -> int:
        return int(self.job.data.seq_len)

    @property
    def elem(self) -> int:
        return DTYPE_BYTES.get(self.job.parent.dtype, 4)

    @property
    def width(self) -> int:
        return int(self.config.hidden_size)

    @property
    def parent_bytes(self) -> float:
        return float(self.parent_params) * self.elem

    @property
    def parent_params(self) -> int:
        return fixed_params(self.config) + sum(block_params(self.config, b) for b in parent_blocks(self.config))

    def child_params(self) -> int:
        return fixed_params(self.config) + sum(block_params(self.config, b) for b in self.child)

    def slots(self, num_cpus: float, num_gpus: float) -> int:
        """Tasks of (num_cpus, num_gpus) that run at once."""
        by_cpu = int(self.cpus // num_cpus) if num_cpus else 10**6
        by_gpu = int(self.gpus // num_gpus) if num_gpus else 10**6
        return max(1, min(by_cpu, by_gpu))

    def threads(self, num_cpus: float) -> int:
        return max(1, min(self.cpus, int(num_cpus) or 1))


def spread(lanes: list[Lane], slots: int, cost) -> list[Lane]:
    """Lanes run `slots` at a time, longest first onto the least loaded slot (as Ray's queue roughly does):
    the stage's lanes become one lane per slot."""
    merged = [Lane(threads=lanes[0].threads if lanes else 1) for _ in range(max(1, min(slots, len(lanes))))]
    loads = [0.0] * len(merged)
    for lane in sorted(lanes, key=cost, reverse=True):
        k = loads.index(min(loads))
        merged[k].passes.extend(lane.passes)
        loads[k] += cost(lane)
    return merged


# ------------------------------------------------------------------------------------------------- stages


def parent_stage(s: JobShape) -> StageWork:
    """puzzle.stages.parent: nothing when the checkpoint is cached or given; the default parent's training
    (ParentRecipe: steps x batch x seq_len tokens, forward + backward of every weight) when it is not; a GGUF
    import dequantises every weight once (counted like initialising them)."""
    work = StageWork("parent", on_device=False)
    work.memory.ray = False
    if s.parent_cached or s.parent_source == "path":
        work.notes.append("parent checkpoint cached or given: nothing to build")
        work.memory.weights = 0.0
        return work
    if s.parent_source == "gguf":
        work.driver.add(Pass("init", 2, float(s.parent_params)))
        work.memory.weights = 2 * s.parent_params * 4.0
        work.notes.append("GGUF import: dequantising counted as initialising every weight twice (read, write)")
        return work
    from puzzle.stages.parent import ParentRecipe, available_cores

    recipe = ParentRecipe()
    seq = recipe.data.seq_len
    rows = recipe.batch_size * seq
    flops = model_flops(s.config, parent_blocks(s.config), seq)
    lane = Lane(threads=available_cores())
    lane.add(train(recipe.steps, flops, rows, s.width, 1.0), vocab(recipe.steps, rows, s.config))
    lane.add(optimizer_step(recipe.steps, s.parent_params))
    evaluate = recipe.eval_max_tokens or 131072
    lane.add(forward(math.ceil(evaluate / (32 * seq)), flops, 32 * seq, s.width))
    work.driver = lane
    work.tokens = recipe.steps * rows
    work.memory.weights = s.parent_params * ADAM_BYTES
    work.memory.activation_sequences.append((recipe.batch_size, _model_activation(s, parent_blocks(s.config)), 1.0))
    work.notes.append("default parent built and cached (tokenizer training not counted)")
    return work


def _model_activation(s: JobShape, blocks: Sequence[BlockConfig], elem: int = 4) -> float:
    return sum(block_activation_bytes(s.config, b, s.seq_len, elem) for b in blocks) + head_activation_bytes(
        s.config, s.seq_len
    )


def bld_stage(s: JobShape) -> StageWork:
    """puzzle.stages.bld: the blocks of plan_blocks, spread over trainers by assign_blocks (runs of consecutive
    layers). Each trainer makes its inputs itself: a parent forward through every layer up to its last, per step and
    per calibration and held-out batch; then every trainable block's forward + backward on the step's batch, and a
    forward of every block on the held-out tokens at the start and the end. Assumes no block is cached yet."""
    from puzzle.stages.bld.plan import assign_blocks, plan_blocks

    cfg, config = s.job.bld, s.config
    specs = plan_blocks(config, s.variants, cfg.mode)
    groups = assign_blocks(specs, config, cfg.num_workers)
    rows = cfg.batch_size * s.seq_len
    steps = ceil_div(cfg.tokens, rows)
    calib = ceil_div(cfg.calibration_tokens, rows)
    heldout = ceil_div(cfg.heldout_tokens, rows)
    parent = parent_blocks(config)
    work = StageWork("bld", tokens=steps * rows, workers=len(groups))
    threads = s.threads(cfg.num_cpus)
    lanes = []
    worst_model, worst_act = 0.0, 0.0
    embed = config.vocab_size * config.hidden_size * s.elem
    for group in groups:
        last = max(spec.layer for spec in group)
        prefix = sum(block_flops(config, parent[i], s.seq_len) for i in range(last + 1))
        prefix_bytes = embed + sum(block_params(config, parent[i]) for i in range(last + 1)) * s.elem
        lane = Lane(threads=threads)
        lane.add(forward(calib, prefix, rows, s.width), forward(steps + 2 * heldout, prefix, rows, s.width))
        optimizer, act = 0.0, 0.0
        for spec in group:
            f = block_flops(config, spec.block, s.seq_len)
            lane.add(forward(2 * heldout, f, rows, s.width))
            if spec.trainable:
                # An attention variant trains only its own weights, beside the frozen parent FFN. That FFN lies above
                # it, so the backward still runs through the whole block: the pass is costed at the rate of a fully
                # trained one (trained share 1; calibration's share counts layers the backward never reaches). At the
                # parameter share (0.29) the demo's attention blocks came to 9.8 s against 15.8-18.5 s measured.
                trained = BlockConfig(spec.attention, NOOP.ffn) if spec.kind == "attention" else spec.block
                params = block_params(config, trained)
                lane.add(train(steps, f, rows, s.width, 1.0), optimizer_step(steps, params))
                optimizer += params * ADAM_BYTES
                if spec.kind == "attention":  # an fp32 copy of the frozen parent FFN it trains beside
                    optimizer += block_params(config, BlockConfig(NOOP.attention, parent[spec.layer].ffn)) * 4
                act += block_activation_bytes(config, spec.block, s.seq_len, 4)
        # The parent states the trainer keeps for its layers (entering, after attention), fp32.
        kept = 2 * (len({spec.layer for spec in group}) + 1) * rows * s.width * 4.0
        lanes.append(lane)
        # A trainer holds the parent's layers up to its last one: in the object store on a CPU (shared), on its
        # own device on a GPU.
        worst_model = max(worst_model, (prefix_bytes if s.gpu else 0.0) + optimizer)
        worst_act = max(worst_act, act / max(len(group), 1))
        work.memory.optimizer += optimizer
        work.memory.transient += kept * (1 + cfg.max_inflight_steps)
        work.memory.activation_sequences.append((cfg.batch_size, act / max(len(group), 1), 1.0))
    work.lanes = spread(lanes, s.slots(cfg.num_cpus, cfg.num_gpus), lambda lane: sum(p.flops for p in lane.passes))
    work.memory.object_store = s.parent_bytes
    work.memory.weights = s.parent_bytes  # the driver's shared copy is the object store's pages
    work.memory.processes = len(groups)
    work.batch_sequences = cfg.batch_size
    work.train_activation_bytes = worst_act
    work.model_bytes = worst_model if s.gpu else s.parent_bytes + worst_model
    work.notes.append(f"{len(groups)} trainers, {sum(1 for x in specs if x.trainable)} blocks trained, {steps} steps")
    return work


def score_stage(s: JobShape) -> StageWork:
    """puzzle.stages.score: Ray tasks of scoring.group_size consecutive layers, each a fresh worker (max_calls=1).
    A task first builds its blocks' layers. Per validation batch it runs the parent once (keeping the states entering
    its layers and the parent's targets), then every scored block of its layers from its layer to the LM head; each
    pass ends in the metrics over the vocabulary. Which blocks and tasks: the stage's own scored_blocks and shards."""
    from puzzle.stages.score import pairs_mode, scored_blocks, shards

    cfg, config = s.job.scoring, s.config
    rows = cfg.batch_size * s.seq_len
    batches = cfg.num_batches or ceil_div(cfg.tokens, rows)
    parent = parent_blocks(config)
    jobs = scored_blocks(s.blocks, parent, pairs_mode(s.job))
    tasks = shards(jobs, cfg.group_size)
    threads = s.threads(cfg.num_cpus)
    full = model_flops(config, parent, s.seq_len)
    lanes = []
    for shard in tasks:
        lane = Lane(threads=threads)
        # The task builds each of its blocks' layers first (constructed, then given the library's weights).
        lane.add(Pass("init", 1, float(sum(block_params(config, b) for _, bl in shard for b in bl))))
        lane.add(forward(batches, full, rows, s.width), vocab(2 * batches, rows, config))
        for i, blocks in shard:
            tail = sum(block_flops(config, parent[j], s.seq_len) for j in range(i + 1, len(parent))) + head_flops(
                config
            )
            for b in blocks:
                lane.add(forward(batches, block_flops(config, b, s.seq_len) + tail, rows, s.width))
                lane.add(vocab(batches, rows, config))
        lanes.append(lane)
    slots = s.slots(cfg.num_cpus, cfg.num_gpus)
    work = StageWork("score", tokens=batches * rows, workers=len(tasks))
    work.lanes = spread(lanes, slots, lambda lane: sum(p.flops for p in lane.passes))
    per_task = (
        rows * config.vocab_size * 4.0 * 3  # the parent's probabilities, its logits and a block's logits
        + 4 * CHUNK * config.vocab_size * 4.0  # a chunk's log-softmax, product and temporaries
        + (cfg.group_size + 2) * rows * s.width * 4.0  # states entering the task's layers
    )
    built = max((sum(block_params(config, b) for _, bl in sh for b in bl) for sh in tasks), default=0) * s.elem
    work.memory.transient = min(slots, len(tasks)) * (per_task + built)
    work.memory.object_store = s.parent_bytes
    work.memory.weights = s.parent_bytes
    work.memory.processes = min(slots, len(tasks))
    work.notes.append(f"{sum(len(b) for _, b in jobs)} blocks scored in {len(tasks)} tasks, {slots} at a time")
    return work


def profile_stage(s: JobShape) -> StageWork:
    """puzzle.stages.profile (measure_batch): per target batch size, the fixed-cost model and a model of
    profiling.stack copies of every unique block, each built with random weights and run warmup + repeats times
    for decode (a prefill to the context, untimed, then decode_steps steps) and for prefill. The driver times them
    itself, unless it joins a Ray cluster for GPUs, where one GPU task does (puzzle.stages.profile.stage)."""
    from puzzle.runner.validate import ray_address
    from puzzle.stages.profile.costs import unique_blocks

    cfg, target, config = s.job.profiling, s.job.target, s.config
    on_worker = 1 if s.gpu and ray_address(s.job) else 0
    work = StageWork("profile", workers=on_worker)
    lane = Lane(threads=s.threads(cfg.num_threads or cfg.num_cpus))
    context, prompt = target.context_len, target.prompt_len
    runs = cfg.warmup + cfg.repeats
    uniques = unique_blocks(s.blocks)
    for b in target.batch_sizes:
        for blocks in [[NOOP], *([blk] * cfg.stack for blk in uniques)]:
            params = sum(block_params(config, x) for x in blocks) + fixed_params(config)
            lane.add(Pass("init", 1, float(params)))
            pre_ctx = model_flops(config, blocks, context, head=False) + head_flops(config) / context
            pre_prompt = model_flops(config, blocks, prompt, head=False) + head_flops(config) / prompt
            step = decode_step(config, blocks, b, context, s.elem)
            flush = s.flush_bytes(b)
            lane.add(forward(runs, pre_ctx, b * context, s.width))
            timed = "decode_cold" if flush else "decode"
            lane.add(Pass(timed, runs * cfg.decode_steps, step.flops, b, s.width, 1.0, step.bytes, step.kernels))
            lane.add(forward(runs, pre_prompt, b * prompt, s.width))
            lane.add(Pass("memory", runs * (cfg.decode_steps + 1), flush))
    work.lanes = [lane]
    kv = max(target.batch_sizes) * context * config.num_key_value_heads * config.head_dim * 2 * s.elem
    work.memory.transient = _profile_models_bytes(s, uniques) + max(_flush_buffer(s, b) for b in target.batch_sizes)
    work.memory.kv_cache = kv * cfg.stack
    work.memory.processes = on_worker
    work.notes.append(f"{len(uniques)} unique blocks x {len(target.batch_sizes)} batch sizes, stacks of {cfg.stack}")
    return work


def _flush_buffer(s: JobShape, batch: int) -> float:
    """The buffer a stopwatch holds when it flushes the cache at `batch`: half the bytes each flush moves (it is read
    and written), twice the last-level cache at most profiling.flush_mib (puzzle.stages.profile.timing); 0 when it
    does not flush."""
    return s.flush_bytes(batch) / 2.0


def _profile_models_bytes(s: JobShape, uniques: Sequence[BlockConfig]) -> float:
    """The most model bytes the profiler holds at once (puzzle.stages.profile.blocks.measure_batch): the fixed-cost
    shell and one round's block models, `profiling.stack` copies each. A round holds as many as fit in
    `profiling.round_gib` at the parent block's size (on a GPU: 30 % of its memory), in the order the blocks come."""
    cfg, config = s.job.profiling, s.config
    shell = float(fixed_params(config) + block_params(config, NOOP)) * s.elem
    sizes = [float(cfg.stack * block_params(config, blk) + fixed_params(config)) * s.elem for blk in uniques]
    parent_model = float(cfg.stack * block_params(config, parent_blocks(config)[0]) + fixed_params(config)) * s.elem
    budget = 0.3 * s.device_memory_bytes if s.gpu else cfg.round_gib * 2**30
    per_round = max(1, int(budget // max(parent_model, 1.0)))
    rounds = [sizes[i : i + per_round] for i in range(0, len(sizes), per_round)] or [[]]
    return shell + max(sum(r) for r in rounds)


def _speed_rounds(s: JobShape, models: list[list[BlockConfig]], rounds: int) -> Lane:
    """puzzle.stages.evaluate.measure_side_by_side: `rounds` rounds of decode and prefill timing of each model with the
    profiler's settings after one untimed round, then one greedy generation (and its warm-up) per model."""
    cfg, target, config = s.job.profiling, s.job.target, s.config
    rounds += 1  # the warm-up round
    prompt, gen, context = target.prompt_len, target.gen_len, target.context_len
    b = target.batch_sizes[0]
    runs = cfg.warmup + cfg.repeats
    flush = s.flush_bytes(b)
    timed = "decode_cold" if flush else "decode"  # the generation after the timing rounds is not flushed
    # Timed with the profiler's thread count (puzzle.stages.evaluate.timing_from_library).
    lane = Lane(threads=s.threads(cfg.num_threads or cfg.num_cpus))
    for blocks in models:
        pre_ctx = model_flops(config, blocks, context, head=False) + head_flops(config) / context
        pre_prompt = model_flops(config, blocks, prompt, head=False) + head_flops(config) / prompt
        step = decode_step(config, blocks, b, context, s.elem)
        gen_step = decode_step(config, blocks, b, prompt + gen // 2, s.elem)
        lane.add(forward(rounds * runs, pre_ctx, b * context, s.width))
        lane.add(Pass(timed, rounds * runs * cfg.decode_steps, step.flops, b, s.width, 1.0, step.bytes, step.kernels))
        lane.add(forward(rounds * runs + 2, pre_prompt, b * prompt, s.width))
        lane.add(Pass("decode", 2 * (gen - 1), gen_step.flops, b, s.width, 1.0, gen_step.bytes, gen_step.kernels))
        lane.add(Pass("memory", rounds * runs * (cfg.decode_steps + 1), flush))
    return lane


TIMING_SPREAD = 0.053
"""The relative spread (standard deviation) of one side-by-side speed-up measurement from one minute to the next, as
the closed loop and the evaluate stage take it: over 19 fresh demo runs on the 2-core CPU VM (2026-12-01 and 12-02),
the evaluate stage's speed-up over the loop's last measurement of the same architecture had a standard deviation of
7.5 %, the difference of two such measurements, so one measurement's is 7.5 % / sqrt(2). Calibration does not measure
it (its probes last seconds, the drift takes minutes); the same figure is assumed on every device."""


def loop_meet_probability(cfg: Any, spread: float = TIMING_SPREAD) -> float:
    """The chance that one closed-loop round aimed at the budget measures inside the band the loop accepts: from
    `measure_tolerance` below the (margined) budget to `measure_overshoot` above it, with the measurement off by a
    normal error of relative `spread`."""
    error = NormalDist(0.0, spread)
    top = 1.0 if cfg.measure_overshoot is None else error.cdf(cfg.measure_overshoot)
    return max(0.0, top - error.cdf(-cfg.measure_tolerance))


def expected_loop_rounds(cfg: Any, spread: float = TIMING_SPREAD) -> float:
    """Rounds a closed loop is expected to time: the first (the block sum's choice, which on the demo and SmolLM2
    runs measured 0.84-0.87 of its prediction and missed), then each later round meets with
    `loop_meet_probability` until `measure_rounds` is reached: 1 + sum_{k < N-1} (1 - p)^k."""
    if cfg.measure_rounds <= 0:
        return 0.0
    miss = 1.0 - loop_meet_probability(cfg, spread)
    return 1.0 + sum(miss**k for k in range(cfg.measure_rounds - 1))


def search_stage(s: JobShape) -> StageWork:
    """puzzle.stages.search: the MIP (num_solutions solves of a layers x variants problem); with a closed loop,
    each round assembles the child and times it beside the parent (measure_side_by_side with measure_repeats rounds).
    The rounds are the expected number (`expected_loop_rounds`): a narrow band against timings that move by a few
    per cent takes more rounds, and `search.measure_rounds` is their upper bound."""
    cfg = s.job.search
    work = StageWork("search")
    rounds = expected_loop_rounds(cfg)
    work.mip_solves = math.ceil(cfg.num_solutions * max(1.0, rounds) * len(s.job.target.batch_sizes))
    work.mip_variables = sum(len(b) for b in s.blocks)
    if rounds:
        lane = _speed_rounds(s, [parent_blocks(s.config), s.child], cfg.measure_repeats)
        lane.passes = [
            Pass(p.kind, p.calls * rounds, p.flops, p.rows, p.width, p.trained, p.bytes, p.kernels) for p in lane.passes
        ]
        work.driver = Lane([Pass("init", rounds, float(s.child_params()))], threads=s.cpus)
        work.serial = [lane]
        work.notes.append(
            f"closed loop: {rounds:.1f} rounds expected of at most {cfg.measure_rounds} (each after the first meets "
            f"the budget with probability {loop_meet_probability(cfg):.2f} at a {TIMING_SPREAD:.1%} timing spread)"
        )
    work.memory.weights = (s.parent_params + s.child_params()) * s.elem
    work.memory.kv_cache = 2 * _kv(s, s.job.target.batch_sizes[0], s.job.target.context_len)
    if rounds:
        work.memory.transient = _flush_buffer(s, s.job.target.batch_sizes[0])
    return work


def _kv(s: JobShape, batch: int, context: int) -> float:
    c = s.config
    return float(batch * context * c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * s.elem)


def gkd_stage(s: JobShape) -> StageWork:
    """puzzle.stages.gkd (worker.py): per micro-batch the frozen parent's forward to its logits and hidden states,
    the child's forward + backward (and a second forward of every layer with activation checkpointing), and the
    loss over the vocabulary in chunks; gkd.num_workers data-parallel replicas. The child is the stand-in of
    `child_blocks` (its size follows the speed-up budget)."""
    cfg, config = s.job.gkd, s.config
    rows = cfg.batch_size * s.seq_len
    per_step = rows * cfg.grad_accum * cfg.num_workers
    steps = ceil_div(cfg.tokens, per_step)
    micro = steps * cfg.grad_accum
    parent_f = model_flops(config, parent_blocks(config), s.seq_len)
    child_f = model_flops(config, s.child, s.seq_len)
    threads = s.threads(cfg.num_cpus)
    work = StageWork("gkd", tokens=steps * per_step, workers=cfg.num_workers + 1)
    for _ in range(cfg.num_workers):
        lane = Lane(threads=threads)
        lane.add(forward(micro, parent_f, rows, s.width), train(micro, child_f, rows, s.width, 1.0))
        if cfg.activation_checkpointing:
            lane.add(forward(micro, child_f - head_flops(config), rows, s.width))
        lane.add(vocab(3 * micro, rows, config), optimizer_step(steps, s.child_params()))
        work.lanes.append(lane)
    child = s.child_params()
    saves = ceil_div(steps, cfg.checkpoint_every) if cfg.checkpoint_every else 0
    work.driver.add(Pass("disk", saves, float(child * ADAM_BYTES)), Pass("init", 1, float(child)))
    layers_act = sum(block_activation_bytes(config, b, s.seq_len, 4) for b in s.child)
    if cfg.activation_checkpointing:  # layer inputs only, plus one layer recomputed at a time
        layers_act = (len(s.child) + 1) * s.seq_len * s.width * 4.0 + max(
            block_activation_bytes(config, b, s.seq_len, 4) for b in s.child
        )
    head_act = 3 * min(rows, cfg.loss_chunk_tokens) * config.vocab_size * 4.0 / cfg.batch_size
    shards = cfg.num_workers if cfg.strategy == "fsdp" else 1  # FSDP shards the child's weights and optimizer state
    work.memory.weights = s.parent_bytes + child * s.elem  # shared parent; the driver's assembled child
    work.memory.optimizer = cfg.num_workers * child * ADAM_BYTES / shards
    work.memory.activation_sequences = [(cfg.batch_size, layers_act + head_act, 1.0)] * cfg.num_workers
    work.memory.transient = cfg.num_workers * rows * config.vocab_size * 4.0 * 2  # the parent's and child's logits
    work.memory.object_store = s.parent_bytes
    work.memory.processes = cfg.num_workers + 1  # the workers and Ray Train's controller
    work.memory.helper_actors = RAY_TRAIN_HELPER_ACTORS
    work.batch_sequences = cfg.batch_size
    work.train_activation_bytes = layers_act + head_act
    work.model_bytes = s.parent_bytes + child * ADAM_BYTES / shards
    work.notes.append(f"{steps} steps of {per_step} tokens; child ~{child / 1e6:.1f}M parameters (stand-in)")
    return work


def evaluate_stage(s: JobShape) -> StageWork:
    """puzzle.stages.evaluate: the parent's and the child's forward on the test tokens (the parent's logits once,
    the metrics of both over the vocabulary), then measure_side_by_side with evaluate.repeats rounds."""
    cfg, config = s.job.evaluate, s.config
    rows = cfg.batch_size * s.seq_len
    batches = ceil_div(cfg.tokens, rows)
    work = StageWork("evaluate", tokens=batches * rows)
    quality = Lane(threads=s.cpus)  # the driver's own thread count
    quality.add(forward(batches, model_flops(config, parent_blocks(config), s.seq_len), rows, s.width))
    quality.add(forward(batches, model_flops(config, s.child, s.seq_len), rows, s.width))
    quality.add(vocab(4 * batches, rows, config), Pass("init", 1, float(s.child_params())))
    work.driver = quality
    work.serial = [_speed_rounds(s, [parent_blocks(config), s.child], cfg.repeats)]
    work.memory.weights = (s.parent_params + s.child_params()) * s.elem
    # A batch's parent and child logits, then in the metrics a contiguous copy and a log-softmax of each (the logits
    # less their last position) and the KL's elementwise terms: 7 [rows, vocab] fp32 arrays (SmolLM2's evaluate
    # stage measured 4.7 of them above the two logits). Then the timing's cache-flush buffer, if it flushes, on top
    # of what glibc kept of those arrays: freed blocks under its largest mmap threshold (32 MiB) stay in the heap
    # until the stage ends (the demo's quality pass left 80 MB there), larger ones go back to the system.
    one = rows * config.vocab_size * 4.0
    quality = 7 * one
    kept = quality if one < GLIBC_MMAP_MAX and not s.gpu else 0.0  # (CUDA's caching allocator reuses its blocks)
    work.memory.transient = max(quality, kept + _flush_buffer(s, s.job.target.batch_sizes[0]))
    work.memory.kv_cache = 2 * _kv(s, s.job.target.batch_sizes[0], s.job.target.context_len)
    return work


def export_stage(s: JobShape) -> StageWork:
    """puzzle.stages.export: the child's weights written as safetensors."""
    work = StageWork("export", on_device=False)
    work.driver.add(Pass("disk", 1, float(s.child_params() * s.elem)))
    work.memory.weights = s.child_params() * s.elem
    return work


def data_stage(s: JobShape) -> StageWork:
    """puzzle.stages.data: tokenising and packing the corpus, cached per machine; not counted (seconds here)."""
    work = StageWork("data", on_device=False)
    work.memory.ray = False
    work.notes.append("tokenising not counted (cached per machine after the first run)")
    return work


def compare_stage(s: JobShape) -> StageWork:
    work = StageWork("compare", on_device=False)
    if s.job.compare.baselines:
        work.notes.append("baselines not counted")
    return work


def serve_stage(s: JobShape) -> StageWork:
    """puzzle.stages.serve: not modelled; engines run in their own processes with their own start-up costs."""
    work = StageWork("serve", on_device=False)
    if s.job.serve.engines or s.job.serve.lm_eval:
        work.notes.append("serving engines and lm-eval not counted")
    return work


BUILDERS = {
    "parent": parent_stage,
    "data": data_stage,
    "bld": bld_stage,
    "score": score_stage,
    "profile": profile_stage,
    "search": search_stage,
    "gkd": gkd_stage,
    "evaluate": evaluate_stage,
    "export": export_stage,
    "serve": serve_stage,
    "compare": compare_stage,
}


def stage_works(s: JobShape, names: Sequence[str]) -> list[StageWork]:
    return [BUILDERS[name](s) for name in names]
