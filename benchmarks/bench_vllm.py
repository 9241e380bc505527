"""A heterogeneous puzzle export served by vLLM (CPU): start-up and generation time, and agreement with puzzle.

    make vllm-env
    .venv/bin/python benchmarks/bench_vllm.py [--hidden 256] [--heads 4] [--layers 4] [--prompts 8] [--new-tokens 16]

Builds a random-weight child (head_dim = hidden / heads; layers cycle through GQA with every KV-head count dividing the
heads, a no-op attention, a no-op FFN and FFN widths 2x, 1.5x and 0.78x hidden; no linear subblocks), exports it with
`puzzle.hf.export.save_child`, runs puzzle/stages/serve/vllm_client.py in .venv-vllm (fp32, greedy, ignore_eos) and
prints:
vLLM's engine start-up and generation time, puzzle's `generate()` time for the same prompts (one at a time, KV cache),
how many prompts / first tokens / steps agree, and the largest |logprob| difference on the chosen tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from puzzle.hf.export import save_child
from puzzle.model.configuration_puzzle import PuzzleConfig
from puzzle.model.modeling_puzzle import PuzzleForCausalLM
from puzzle.stages.serve.clients import engine_env

REPO = Path(__file__).resolve().parents[1]
VOCAB = 512


def block_pattern(hidden: int, heads: int, layers: int) -> list[dict]:
    groups = [g for g in range(1, heads + 1) if heads % g == 0]
    widths = [2 * hidden, 3 * hidden // 2, None, (hidden * 25) // 32]
    blocks = []
    for i in range(layers):
        attention = {"no_op": True} if i % 4 == 1 else {"n_heads_in_group": groups[i % len(groups)]}
        width = widths[i % 4]
        blocks.append(
            {"attention": attention, "ffn": {"no_op": True} if width is None else {"intermediate_size": width}}
        )
    return blocks


def build_child(hidden: int, heads: int, layers: int, seed: int = 0) -> PuzzleForCausalLM:
    config = PuzzleConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        block_configs=block_pattern(hidden, heads, layers),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = PuzzleForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 1.0 if "embed_tokens" in name else hidden**-0.5 * 1.6)
    return model


def puzzle_greedy(model: PuzzleForCausalLM, prompts: list[list[int]], new_tokens: int) -> tuple[list, list, float]:
    """Tokens and chosen-token logprobs from puzzle's generate (EOS not masked: eos_token_id unset)."""
    model.generation_config.eos_token_id = None
    tokens, logprobs, start = [], [], time.perf_counter()
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=new_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
            chosen = out.sequences[0, len(prompt) :].tolist()
            tokens.append(chosen)
            logprobs.append([torch.log_softmax(s[0], -1)[t].item() for s, t in zip(out.logits, chosen, strict=True)])
    return tokens, logprobs, time.perf_counter() - start


def run_vllm(export: Path, prompts: list[list[int]], new_tokens: int, work: Path) -> tuple[dict, float, float]:
    """vLLM's greedy result for the child, its engine start-up and its generation time (one batch of all prompts)."""
    env = engine_env(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CACHE_ROOT=str(work / "vllm-cache"))
    spec = {"models": {"child": str(export)}, "greedy": {"prompts": prompts, "new_tokens": new_tokens}}
    (work / "spec.json").write_text(json.dumps(spec))
    command = [str(REPO / ".venv-vllm/bin/python"), str(REPO / "puzzle/stages/serve/vllm_client.py")]
    run = subprocess.run([*command, str(work / "spec.json"), str(work / "out.json")], cwd=work, env=env, text=True,
                         capture_output=True)  # fmt: skip
    if run.returncode != 0:
        sys.exit(f"vLLM failed:\n{run.stderr[-4000:]}")
    result = json.loads((work / "out.json").read_text())
    child = result["models"]["child"]
    return {"version": result["version"], **child["greedy"]}, child["load_s"], child["greedy_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    if not (REPO / ".venv-vllm/bin/python").is_file():
        sys.exit("no .venv-vllm: run `make vllm-env` first")
    gen = torch.Generator().manual_seed(1)
    prompts = [[1] + torch.randint(3, VOCAB, (int(n),), generator=gen).tolist() for n in torch.arange(args.prompts) + 2]
    child = build_child(args.hidden, args.heads, args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        export = save_child(child, Path(tmp) / "export")
        result, load_s, generate_s = run_vllm(export, prompts, args.new_tokens, Path(tmp))
    tokens, logprobs, puzzle_s = puzzle_greedy(child, prompts, args.new_tokens)

    steps = sum(len(t) for t in tokens)
    same_steps = sum(a == b for x, y in zip(result["tokens"], tokens, strict=True) for a, b in zip(x, y, strict=True))
    worst = max(
        abs(step[str(t)] - lp)
        for got, want, lps in zip(result["logprobs"], tokens, logprobs, strict=True)
        for step, t, lp in zip(got, want, lps, strict=True)
        if str(t) in step  # a diverged step has no logprob for puzzle's token
    )
    params = sum(p.numel() for p in child.parameters())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(
        f"child: {args.layers} layers, hidden {args.hidden}, {args.heads} heads (head_dim {args.hidden // args.heads})"
    )
    print(
        f"       {params / 1e6:.2f}M params, blocks: {[child.config.block_config(i).name for i in range(args.layers)]}"
    )
    print(f"vLLM {result['version']}: engine start-up {load_s:.1f} s")
    shape = f"{args.prompts} prompts x {args.new_tokens} tokens"
    print(f"vLLM generate: {shape} in {generate_s:.2f} s ({steps / generate_s:.1f} tok/s)")
    print(f"puzzle generate (one prompt at a time): {puzzle_s:.2f} s ({steps / puzzle_s:.1f} tok/s)")
    same = sum(a == b for a, b in zip(result["tokens"], tokens, strict=True))
    first = sum(a[0] == b[0] for a, b in zip(result["tokens"], tokens, strict=True))
    print(f"agreement: prompts {same}/{len(prompts)}, first tokens {first}/{len(prompts)}, steps {same_steps}/{steps}")
    print(f"largest |logprob(vLLM) - logprob(puzzle)| on chosen tokens: {worst:.2e}")


if __name__ == "__main__":
    main()
