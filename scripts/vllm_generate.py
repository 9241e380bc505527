"""Greedy generation from a puzzle export with vLLM; prints the generated token ids as JSON.

Run by the interpreter of the separate vLLM environment (`make vllm-env`), never by puzzle's own .venv:

    .venv-vllm/bin/python scripts/vllm_generate.py runs/x/export --prompts '[[5, 6, 7], [9, 10]]' --max-new-tokens 8

Prompts are token-id lists (no tokenizer round trip, so the comparison with transformers is exact). The last line
on stdout is one JSON object: `vllm_version`, `load_s` (engine start-up), `generate_s`, `tokens` (one list per prompt)
and `logprobs` (per prompt, per step, the top-2 candidates as {token id: logprob}, so a caller can tell a real
disagreement from a near tie); `--out` also writes it to a file (vLLM logs to stdout too). vLLM's engine spawns worker
processes, which is why this is a script file (a `__main__` guard) rather than code piped to stdin.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", help="directory written by puzzle.hf.export.save_child")
    parser.add_argument("--prompts", required=True, help="JSON list of token-id lists, or @FILE holding one")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=None, help="default: the config's max positions")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    return parser.parse_args(argv)


def load_prompts(spec: str) -> list[list[int]]:
    text = Path(spec[1:]).read_text() if spec.startswith("@") else spec
    prompts = json.loads(text)
    if not (isinstance(prompts, list) and prompts and all(isinstance(p, list) and p for p in prompts)):
        raise SystemExit(f"--prompts must be a non-empty JSON list of non-empty token-id lists, got {text[:80]!r}")
    return [[int(t) for t in p] for p in prompts]


def generate(args: argparse.Namespace) -> dict:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # An export saved without a tokenizer still serves token ids: vLLM then skips tokenizer set-up and detokenizing.
    has_tokenizer = any((Path(args.export) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    start = time.perf_counter()
    llm = LLM(
        model=args.export,
        tokenizer=args.export,
        skip_tokenizer_init=not has_tokenizer,
        trust_remote_code=True,  # the export's config class ships as code next to the weights
        dtype=args.dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=True,  # no graph capture or compilation: minutes saved on a tiny model
        max_model_len=args.max_model_len,
        seed=0,
    )
    # ignore_eos: random weights may emit EOS early, and we compare a fixed number of steps.
    params = SamplingParams(
        temperature=0.0, max_tokens=args.max_new_tokens, ignore_eos=True, logprobs=2, detokenize=has_tokenizer
    )
    prompts = [TokensPrompt(prompt_token_ids=p) for p in load_prompts(args.prompts)]
    loaded = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    done = time.perf_counter()
    completions = [out.outputs[0] for out in outputs]
    return {
        "vllm_version": vllm.__version__,
        "load_s": round(loaded - start, 3),
        "generate_s": round(done - loaded, 3),
        "tokens": [list(c.token_ids) for c in completions],
        "logprobs": [
            [{str(tok): lp.logprob for tok, lp in step.items()} for step in (c.logprobs or [])] for c in completions
        ],
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = generate(args)
    text = json.dumps(result)
    if args.out:
        Path(args.out).write_text(text + "\n")
    sys.stdout.flush()
    print(text, flush=True)


if __name__ == "__main__":
    main()
