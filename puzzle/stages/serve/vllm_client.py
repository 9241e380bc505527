"""Serve checkpoints in vLLM: greedy tokens and generation throughput, as one JSON object.

Run by the interpreter of the separate vLLM environment (`make vllm-env`), never by puzzle's own: it imports only
vLLM and the standard library, and puzzle's serve stage (puzzle.stages.serve) runs it by path:

    .venv-vllm/bin/python puzzle/stages/serve/vllm_client.py SPEC.json OUT.json

SPEC.json:
    {"models": {"parent": DIR, "child": DIR},          # loaded side by side in this one process
     "dtype": "float32", "max_model_len": null,
     "greedy": {"prompts": [[token ids], ...], "new_tokens": 16, "logprobs": 2},      # optional
     "throughput": {"batch_sizes": [1, 8], "prompt_len": 64, "gen_len": 64,           # optional
                    "repeats": 3, "seed": 0}}

OUT.json: {"engine": "vllm", "version", "models": {name: {"load_s", "greedy": {"tokens", "logprobs"}, "greedy_s",
"throughput": {batch size: [tokens/s of each repeat]}}}}. Prompts are token ids (no tokenizer round trip, so the
comparison with puzzle is exact); `logprobs` gives per step the top candidates as {token id: logprob}, so a caller
can tell a real disagreement from a near tie. Throughput is generated tokens per second of whole generations
(prefill included) of `batch` random prompts of prompt_len tokens, gen_len tokens each, EOS ignored; the models are
timed in alternation, round after round, after one warm-up each, so a change in machine load hits them alike.
vLLM's engine spawns worker processes, which is why this is a file with a `__main__` guard.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any


def load(path: str, spec: dict[str, Any]) -> Any:
    from vllm import LLM

    # An export saved without a tokenizer still serves token ids: vLLM then skips tokenizer set-up and detokenizing.
    has_tokenizer = any((Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    return LLM(
        model=path,
        tokenizer=path,
        skip_tokenizer_init=not has_tokenizer,
        trust_remote_code=True,  # a puzzle export's config class ships as code next to its weights
        dtype=spec.get("dtype", "float32"),
        gpu_memory_utilization=spec.get("gpu_memory_utilization", 0.3),
        enforce_eager=spec.get("enforce_eager", True),  # no graph capture: minutes saved on small models
        max_model_len=spec.get("max_model_len"),
        seed=0,
    )


def greedy(llm: Any, spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(
        temperature=0.0,
        max_tokens=spec["new_tokens"],
        ignore_eos=True,  # a fixed number of steps to compare
        logprobs=spec.get("logprobs", 2),
        detokenize=False,
    )
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params, use_tqdm=False)
    completions = [out.outputs[0] for out in outputs]
    return {
        "tokens": [list(c.token_ids) for c in completions],
        "logprobs": [
            [{str(tok): lp.logprob for tok, lp in step.items()} for step in (c.logprobs or [])] for c in completions
        ],
    }


def throughput(models: dict[str, Any], spec: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    rng = random.Random(spec.get("seed", 0))
    vocab = spec["vocab_size"]
    params = SamplingParams(temperature=0.0, max_tokens=spec["gen_len"], ignore_eos=True, detokenize=False)
    out: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    for batch in spec["batch_sizes"]:
        prompts = [
            TokensPrompt(prompt_token_ids=[rng.randrange(vocab) for _ in range(spec["prompt_len"])])
            for _ in range(batch)
        ]
        for llm in models.values():  # warm-up
            llm.generate(prompts, params, use_tqdm=False)
        for _ in range(spec["repeats"]):
            for name, llm in models.items():
                start = time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False)
                out[name].setdefault(str(batch), []).append(batch * spec["gen_len"] / (time.perf_counter() - start))
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: vllm_client.py SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    import vllm

    result: dict[str, Any] = {"engine": "vllm", "version": vllm.__version__, "models": {}}
    models = {}
    for name, path in spec["models"].items():
        start = time.perf_counter()
        models[name] = load(path, spec)
        result["models"][name] = {"load_s": round(time.perf_counter() - start, 3)}
    if spec.get("greedy"):
        for name, llm in models.items():
            start = time.perf_counter()
            result["models"][name]["greedy"] = greedy(llm, spec["greedy"])
            result["models"][name]["greedy_s"] = round(time.perf_counter() - start, 3)
    if spec.get("throughput"):
        for name, figures in throughput(models, spec["throughput"]).items():
            result["models"][name]["throughput"] = figures
    Path(argv[1]).write_text(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
