"""A puzzle export loads in mlx-lm (its CPU backend on Linux) and its greedy tokens equal puzzle's.

mlx-lm lives in its own environment: `make mlx-env` creates .venv-mlx with `mlx-lm[cpu]`. Without it these tests
are skipped.

    make mlx-env && .venv/bin/pytest tests/test_mlx.py -m slow -q
"""

from __future__ import annotations

import json
import subprocess

from tiny import clear_margins, engine_marks

from puzzle.hf.engines import check_export, engines_named
from puzzle.hf.export import save_child
from puzzle.model.configuration_puzzle import PuzzleConfig
from puzzle.model.modeling_puzzle import PuzzleForCausalLM
from puzzle.stages.serve.clients import engine_env, engine_python
from puzzle.stages.serve.stage import puzzle_greedy

pytestmark = engine_marks("mlx")

# mlx-lm sizes attention from hidden / heads, so head_dim must be that (four heads of 64 on 256). Every kind it
# serves: GQA at both KV-head counts, no-op attention, no-op FFN, FFN widths 512 and 768 (ffn_mult 3 and 4.5).
BLOCKS = [
    {"attention": {"n_heads_in_group": 2}, "ffn": {"intermediate_size": 512}},
    {"attention": {"no_op": True}, "ffn": {"intermediate_size": 768}},
    {"attention": {"n_heads_in_group": 1}, "ffn": {"no_op": True}},
    {"attention": {"n_heads_in_group": 4}, "ffn": {"intermediate_size": 768}},
]
PROMPTS = [[5, 6, 7, 8, 9, 10], [12, 13, 14], [88, 65]]
NEW_TOKENS = 12
GREEDY = """
import json, sys
from pathlib import Path
import mlx.core as mx
from mlx_lm.utils import load_model
model, _ = load_model(Path(sys.argv[1]))
out = []
for prompt in json.loads(sys.argv[2]):
    ids = list(prompt)
    for _ in range(int(sys.argv[3])):
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1]).item()))
    out.append(ids[len(prompt):])
print(json.dumps(out))
"""


def test_mlx_lm_greedy_tokens_equal_puzzle(tmp_path):
    config = PuzzleConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=len(BLOCKS),
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=64,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                          block_configs=BLOCKS)  # fmt: skip
    child = clear_margins(PuzzleForCausalLM(config), seed=2)
    export = save_child(child, tmp_path / "export")
    assert all(v.loads for v in check_export(export, engines_named(["mlx_lm"])))
    run = subprocess.run([str(engine_python("mlx")), "-c", GREEDY, str(export), json.dumps(PROMPTS), str(NEW_TOKENS)],
                         cwd=tmp_path, env=engine_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == puzzle_greedy(child, PROMPTS, NEW_TOKENS)
