"""A puzzle export loads and generates in vLLM: greedy tokens equal transformers' on a heterogeneous child.

vLLM lives in its own environment (it pins its own torch): `make vllm-env` creates .venv-vllm, and
puzzle/stages/serve/vllm_client.py runs there in a subprocess. Without that environment these tests are skipped.

    make vllm-env && .venv/bin/pytest tests/test_vllm.py -m slow -q
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny import TINY_VOCAB, clear_margins, engine_marks, tiny_tokenizer
from transformers import AutoModelForCausalLM

from puzzle.hf.export import linear_layers, save_child
from puzzle.model.configuration_puzzle import PuzzleConfig
from puzzle.model.modeling_puzzle import PuzzleForCausalLM
from puzzle.stages.serve.clients import run_client

pytestmark = engine_marks("vllm")

# head_dim 64 (256 / 4): vLLM's CPU attention rejects small head sizes such as 16.
HIDDEN, HEADS, PARENT_KV, PARENT_FFN = 256, 4, 4, 512
# Every layer differs: KV heads 4 / - / 2 / 1, FFN widths 512 / 384 / none / 200 (200 is not a multiple of 256, so
# only an exact intermediate_size reproduces it); one no-op attention, one no-op FFN, no linear subblocks.
BLOCKS = [
    {"attention": {"n_heads_in_group": 1}, "ffn": {"intermediate_size": 512}},
    {"attention": {"no_op": True}, "ffn": {"intermediate_size": 384}},
    {"attention": {"n_heads_in_group": 2}, "ffn": {"no_op": True}},
    {"attention": {"n_heads_in_group": 4}, "ffn": {"intermediate_size": 200}},
]
PROMPTS = [
    [1, 5, 6, 7],
    [1, 100, 42, 17, 9, 88, 23],
    [1, 64],
    [1, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22],
    [1, 127, 4, 99, 31],
]
NEW_TOKENS = 12


def heterogeneous_child(seed: int = 0) -> PuzzleForCausalLM:
    """A 4-layer child with random weights scaled so greedy choices have clear margins (no near ties by chance)."""
    config = PuzzleConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=PARENT_FFN,
        num_hidden_layers=len(BLOCKS),
        num_attention_heads=HEADS,
        num_key_value_heads=PARENT_KV,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        block_configs=BLOCKS,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return clear_margins(PuzzleForCausalLM(config), seed)


def greedy(model: torch.nn.Module, prompt: list[int]) -> tuple[list[int], list[float]]:
    """Greedy continuation of one prompt and the log-probability of each chosen token.

    A plain argmax loop over full forwards, as vLLM with ignore_eos does it: `generate(min_new_tokens=...)` would
    instead mask EOS, changing both the argmax and the normalisation of the log-probabilities.
    """
    ids = torch.tensor([prompt])
    tokens, logprobs = [], []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            step = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
            token = int(step.argmax())
            tokens.append(token)
            logprobs.append(step[token].item())
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokens, logprobs


def run_vllm(models: dict[str, Path], tmp_path: Path, **sections) -> dict:
    """The vLLM client on `models` ({name: checkpoint}) with the spec's optional sections (greedy, throughput)."""
    return run_client("vllm", {"models": {k: str(v) for k, v in models.items()}, **sections}, tmp_path, 900)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[PuzzleForCausalLM, Path, dict]:
    tmp_path = tmp_path_factory.mktemp("vllm")
    child = heterogeneous_child()
    assert linear_layers(child.config) == []
    export = save_child(child, tmp_path / "export", tokenizer=tiny_tokenizer())
    result = run_vllm(
        {"child": export, "again": export},  # two engines side by side in one process, as the serve stage runs them
        tmp_path,
        greedy={"prompts": PROMPTS, "new_tokens": NEW_TOKENS, "logprobs": 2},
        throughput={"batch_sizes": [1, 2], "prompt_len": 8, "gen_len": 4, "repeats": 1, "vocab_size": TINY_VOCAB},
    )
    return child, export, result


def test_vllm_greedy_tokens_equal_puzzle_and_transformers(exported):
    child, export, result = exported
    reloaded = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32).eval()
    assert result["models"]["again"]["greedy"] == result["models"]["child"]["greedy"]
    for prompt, vllm_tokens in zip(PROMPTS, result["models"]["child"]["greedy"]["tokens"], strict=True):
        tokens, _ = greedy(child, prompt)
        assert greedy(reloaded, prompt)[0] == tokens
        assert vllm_tokens == tokens, f"prompt {prompt}: vLLM {vllm_tokens} vs puzzle {tokens}"


def test_vllm_logprobs_match_puzzle(exported):
    """Beyond the argmax: vLLM's log-probability of each chosen token agrees with puzzle's in fp32."""
    child, _, result = exported
    worst = 0.0
    for prompt, steps in zip(PROMPTS, result["models"]["child"]["greedy"]["logprobs"], strict=True):
        tokens, logprobs = greedy(child, prompt)
        assert len(steps) == NEW_TOKENS
        for token, expected, step in zip(tokens, logprobs, steps, strict=True):
            got = step[str(token)]
            assert math.isfinite(got)
            worst = max(worst, abs(got - expected))
    assert worst < 1e-3, f"largest |logprob difference| between vLLM and puzzle: {worst:.2e}"


def test_vllm_throughput_is_timed_for_every_model_and_batch(exported):
    _, _, result = exported
    for name in ("child", "again"):
        figures = result["models"][name]["throughput"]
        assert sorted(figures) == ["1", "2"] and all(len(v) == 1 and v[0] > 0 for v in figures.values())
