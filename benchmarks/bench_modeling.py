"""Overhead of puzzle's heterogeneous model over transformers' own Llama, with the same weights, on this machine.

    .venv/bin/python benchmarks/bench_modeling.py [--device cpu|cuda] [--dtype float32|bfloat16] [--threads 2]

Builds a random Llama parent (default: 4 layers, hidden 256, 8 heads, 2 KV heads, intermediate 768, vocab 4096),
converts it with puzzle.hf.convert.puzzle_config_from_hf, checks the logits agree, then times prefill (batch 2 x 128
tokens) and greedy decoding with a KV cache (batch 2, 32 new tokens) for both models, median of --repeats runs.
Also times a heterogeneous child of the same parent (no-op attention in half the layers, half-width FFNs) to show the
model's speed follows its blocks.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from puzzle.hf.convert import puzzle_config_from_hf
from puzzle.model.modeling_puzzle import PuzzleConfig, PuzzleForCausalLM


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_seconds(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _measure(model: torch.nn.Module, args: argparse.Namespace) -> tuple[float, float]:
    prompt = torch.randint(3, args.vocab, (args.batch, args.prompt), device=args.device)
    short = prompt[:, :8]
    with torch.no_grad():
        prefill = _median_seconds(lambda: model(prompt), args.repeats, args.device)
        generate = _median_seconds(
            lambda: model.generate(
                short, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False
            ),
            args.repeats,
            args.device,
        )
    return args.batch * args.prompt / prefill, args.batch * args.new_tokens / generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    hf_config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=None,
        pad_token_id=0,
    )
    llama = LlamaForCausalLM(hf_config).to(args.device, dtype).eval()
    parent = PuzzleForCausalLM(puzzle_config_from_hf(hf_config)).to(args.device, dtype).eval()
    parent.load_state_dict(llama.state_dict())
    with torch.no_grad():
        x = torch.randint(3, args.vocab, (2, 64), device=args.device)
        diff = (parent(x).logits.float() - llama(x).logits.float()).abs().max().item()

    blocks = []
    for i in range(args.layers):
        attention = {"no_op": True} if i % 2 else {"n_heads_in_group": 4}
        blocks.append({"attention": attention, "ffn": {"intermediate_size": 3 * args.hidden // 2}})
    child_config = PuzzleConfig(**{**parent.config.to_dict(), "block_configs": blocks})
    child = PuzzleForCausalLM(child_config).to(args.device, dtype).eval()

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(
        f"device={args.device} ({device_name}), dtype={args.dtype}, threads={args.threads}, torch {torch.__version__}"
    )
    print(
        f"model: {args.layers} layers, hidden {args.hidden}, 8 heads / 2 KV heads, vocab {args.vocab}; "
        f"prefill batch {args.batch} x {args.prompt}, decode batch {args.batch} x {args.new_tokens} new tokens"
    )
    print(f"max |logits(puzzle) - logits(HF Llama)| = {diff:.2e}")
    for name, model in [("HF LlamaForCausalLM", llama), ("puzzle all-parent", parent), ("puzzle child", child)]:
        prefill, decode = _measure(model, args)
        print(f"{name:22s} prefill {prefill:10.0f} tok/s   decode {decode:8.1f} tok/s")


if __name__ == "__main__":
    main()
