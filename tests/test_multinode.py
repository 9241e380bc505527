"""Two Ray nodes on this machine (`ray start --head`, `ray start --address`, one CPU and a distinct custom resource
each): BLD and scoring of a tiny job put work on both nodes and give the results of a one-node cluster.

Each run happens in its own Python process (`python -m tests.test_multinode ADDRESS OUT`), so the test session's own
Ray connection is left alone; the nodes run under `ray start --block` and are stopped by ending those processes, never
by `ray stop` (which would stop every Ray cluster on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT), PUZZLE_CACHE=str(tmp))
    return env


def _run_job(address: str, out: Path, tmp: Path) -> dict:
    cmd = [sys.executable, "-m", "tests.test_multinode", address, str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.fixture
def two_nodes(tmp_path):
    """A head (resource node_a) and a second raylet (node_b) on this machine, one CPU each; yields the address."""
    port = _free_port()
    temp = Path("/tmp") / f"ray_mn_{port}"  # short: Ray's socket paths must fit in 107 bytes
    env = _env(tmp_path)
    common = ["--block", "--disable-usage-stats", f"--temp-dir={temp}", "--num-cpus=1", "--num-gpus=0"]
    head = [RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", *common]
    procs = [
        subprocess.Popen(
            [*head, '--resources={"node_a": 1}'], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    ]
    try:
        address = f"127.0.0.1:{port}"
        _wait_for_nodes(address, 1, env)
        worker = [RAY, "start", f"--address={address}", *common, '--resources={"node_b": 1}']
        procs.append(subprocess.Popen(worker, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_for_nodes(address, 2, env)
        yield address
    finally:
        for proc in reversed(procs):  # ray start --block stops its node's processes when it is terminated
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_nodes(address: str, count: int, env: dict[str, str], timeout: float = 120.0) -> None:
    code = (
        "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = subprocess.run([sys.executable, "-c", code, address], env=env, capture_output=True, text=True)
        if proc.returncode == 0 and proc.stdout.strip() and int(proc.stdout.split()[-1]) >= count:
            return
        time.sleep(2)
    raise AssertionError(f"Ray at {address} did not reach {count} nodes in {timeout:.0f} s")


@pytest.mark.integration
def test_bld_and_scoring_use_both_nodes_and_match_one_node(two_nodes, tmp_path):
    two = _run_job(two_nodes, tmp_path / "two", tmp_path)
    one = _run_job("local", tmp_path / "one", tmp_path)
    # Work went to both nodes: the two BLD trainers (one CPU each) and the scoring tasks.
    assert len(set(two["bld_nodes"])) == 2 and set(two["bld_resources"]) == {"node_a", "node_b"}
    assert len(two["score_nodes"]) == 2 and set(two["score_resources"]) == {"node_a", "node_b"}
    assert len(set(one["bld_nodes"])) == 1
    # The same blocks (keys, held-out errors, weights) and the same scores as on one node.
    assert two["blocks"] == one["blocks"]
    assert two["scores"].keys() == one["scores"].keys()
    for layer, by_name in one["scores"].items():
        for name, metrics in by_name.items():
            for metric, value in metrics.items():
                assert two["scores"][layer][name][metric] == pytest.approx(value, abs=1e-9), (layer, name, metric)


# ------------------------------------------------------------------------------------------ the job, in a subprocess


def _job(address: str, out: Path) -> None:
    import hashlib

    import ray
    import torch
    from safetensors.torch import load_file

    from puzzle.config import BLDConfig
    from puzzle.hf.convert import load_parent
    from puzzle.model.block_config import AttentionConfig, FFNConfig
    from puzzle.stages.bld import run_bld
    from puzzle.stages.score import score_blocks
    from tests.tiny import save_tiny_parent

    if address == "local":
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    torch.manual_seed(0)
    parent = load_parent(save_tiny_parent(out / "parent"))
    seq = 16
    tokens = torch.randint(4, 128, (48, seq), generator=torch.Generator().manual_seed(0))
    attn = [AttentionConfig(n_heads_in_group=4), AttentionConfig(no_op=True)]
    ffn = [FFNConfig(intermediate_size=32), FFNConfig(no_op=True)]
    cfg = BLDConfig(tokens=6 * 4 * seq, lr=3e-3, batch_size=4, num_workers=2, num_cpus=1, calibration_tokens=16 * seq)
    store = run_bld(parent, [{"attention": attn, "ffn": ffn}] * 2, tokens[:24], tokens[24:], cfg, out / "lib")
    blocks = {}
    for layer, kinds in sorted(store.index.items()):
        for kind, entries in sorted(kinds.items()):
            for name, e in sorted(entries.items()):
                digest = None
                if e["file"]:
                    weights = load_file(str(store.root / e["file"]))
                    digest = hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()
                blocks[f"{layer}/{kind}/{name}"] = [e["hash"], e["nmse_init"], e["nmse_trained"], digest]
    variants = [_pairs(parent, i) for i in range(2)]
    batches = list(tokens[:8].split(4))
    scores, info = score_blocks(parent, store, variants, batches, use_ray=True, group_size=1, progress=False)
    resources = {n["NodeID"]: [r for r in n["Resources"] if r.startswith("node_")] for n in ray.nodes() if n["Alive"]}
    result = {
        "bld_nodes": store.last_run["trainer_nodes"],
        "bld_resources": sorted({r for node in store.last_run["trainer_nodes"] for r in resources.get(node, [])}),
        "score_nodes": info["nodes"],
        "score_resources": sorted({r for node in info["nodes"] for r in resources.get(node, [])}),
        "blocks": blocks,
        "scores": scores,
    }
    (out / "result.json").write_text(json.dumps(result))
    ray.shutdown()


def _pairs(parent, layer: int) -> list:
    from puzzle.model.block_config import AttentionConfig, BlockConfig, FFNConfig

    own = parent.config.block_config(layer)
    return [own] + [
        BlockConfig(a, f)
        for a in (own.attention, AttentionConfig(n_heads_in_group=4), AttentionConfig(no_op=True))
        for f in (own.ffn, FFNConfig(intermediate_size=32), FFNConfig(no_op=True))
        if BlockConfig(a, f) != own
    ]


if __name__ == "__main__":
    _job(sys.argv[1], Path(sys.argv[2]))
