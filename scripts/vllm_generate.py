"""Greedy generation from a puzzle export with vLLM; prints the generated token ids as JSON.

Run by the interpreter of the separate vLLM environment (`make vllm-env`), never by puzzle's own .venv:

    .venv-vllm/bin/python scripts/vllm_generate.py runs/x/export --prompts '[[5, 6, 7], [9, 10]]' --max-new-tokens 8

Prompts are token-id lists (no tokenizer round trip, so the comparison with transformers is exact). The last line on
stdout is `{"vllm_version": ..., "tokens": [[...], ...], "logprobs": [[{id: logprob, ...}, ...], ...]}`; with `--out`
the same JSON also goes to that file (vLLM logs to stdout too). `logprobs` holds the top-2 candidates of every step, so
a caller can tell a real disagreement from a near tie. vLLM's engine spawns worker processes, which is why this is a
script file (a `__main__` guard) rather than code piped to stdin.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", help="directory written by puzzle.export.save_child")
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

    llm = LLM(
        model=args.export,
        tokenizer=args.export,
        trust_remote_code=True,  # the export's config class ships as code next to the weights
        dtype=args.dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=True,  # no graph capture or compilation: minutes saved on a tiny model
        max_model_len=args.max_model_len,
        seed=0,
    )
    # ignore_eos: random weights may emit EOS early, and we compare a fixed number of steps.
    params = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens, ignore_eos=True, logprobs=2)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in load_prompts(args.prompts)], params)
    completions = [out.outputs[0] for out in outputs]
    return {
        "vllm_version": vllm.__version__,
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
