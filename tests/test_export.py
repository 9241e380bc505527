"""Export (puzzle.hf.export): checkpoint layout, DeciLM config, atomic writes, and a round trip without puzzle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import TINY_VOCAB, save_tiny_parent, tiny_demo_child, tiny_tokenizer
from transformers import AutoModelForCausalLM

from puzzle.errors import PuzzleError
from puzzle.hf.convert import load_parent
from puzzle.hf.export import save_child
from puzzle.model.configuration_puzzle import PuzzleConfig
from puzzle.model.modeling_puzzle import PuzzleForCausalLM

BLOCKS = [
    {"attention": {"no_op": True}, "ffn": {"intermediate_size": 40}},
    {"attention": {"n_heads_in_group": 4}, "ffn": {"replace_with_linear": True}},
    {"attention": {"replace_with_linear": True}, "ffn": {"no_op": True}},
    {"attention": {"n_heads_in_group": 1}, "ffn": {"intermediate_size": 24}},
]


@pytest.fixture
def child() -> PuzzleForCausalLM:
    config = PuzzleConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        block_configs=BLOCKS,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = PuzzleForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model


# The scripts below run in a fresh interpreter (-I: no PYTHONPATH, no cwd on sys.path) where importing puzzle is
# blocked outright, so an editable install of puzzle cannot leak in either.
BLOCK_PUZZLE = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockPuzzle(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "puzzle" or name.startswith("puzzle."):
                raise ImportError("puzzle is hidden in this test")
            return None

    sys.meta_path.insert(0, BlockPuzzle())
    try:
        import puzzle  # noqa: F401
        raise SystemExit("puzzle was importable")
    except ImportError:
        pass
    """
)

ROUND_TRIP = BLOCK_PUZZLE + textwrap.dedent(
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export, io_dir = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    assert "puzzle" not in sys.modules and type(model).__module__.startswith("transformers_modules"), type(model)
    # What vLLM's DeciLMForCausalLM reads from the config: attribute access into block_configs, no ffn_mult (width 24
    # is no multiple of 256), so it falls back to intermediate_size.
    blocks = model.config.block_configs
    assert blocks[0].attention.no_op and blocks[1].attention.n_heads_in_group == 4
    assert blocks[3].ffn.intermediate_size == 24 and not hasattr(blocks[3].ffn, "ffn_mult")
    ids = load_file(io_dir + "/input.safetensors")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    tokens = model.generate(ids[:, :6], max_new_tokens=8, do_sample=False)
    tokenizer = AutoTokenizer.from_pretrained(export)
    encoded = torch.tensor(tokenizer("w5 w6 w7")["input_ids"])
    save_file({"logits": logits, "tokens": tokens, "encoded": encoded}, io_dir + "/output.safetensors")
    """
)


# The exported code with plain transformers: greedy generation with the KV cache (whatever name this transformers'
# generate() passes it under) equals generation without it, and step decoding takes the cache under either name.
CACHED_GENERATION = BLOCK_PUZZLE + textwrap.dedent(
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    def cache_of(out):  # the output field is `cache` from transformers 5.24 on, `past_key_values` before
        return out.cache if hasattr(out, "cache") else out.past_key_values

    export, io_dir = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    assert "puzzle" not in sys.modules and type(model).__module__.startswith("transformers_modules"), type(model)
    prompt = load_file(io_dir + "/input.safetensors")["prompt"]
    cached = model.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=True, return_dict_in_generate=True)
    uncached = model.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=False)
    out = {"cached": cached.sequences, "uncached": uncached}
    out["cache_length"] = torch.tensor(cache_of(cached).get_seq_length())
    with torch.no_grad():
        for name in ("cache", "past_key_values"):
            step = model(prompt[:, :2], use_cache=True)
            cache, logits = cache_of(step), [step.logits]
            for t in range(2, prompt.shape[1]):
                logits.append(model(prompt[:, t : t + 1], use_cache=True, **{name: cache}).logits)
            out["steps_" + name] = torch.cat(logits, dim=1)
    save_file(out, io_dir + "/output.safetensors")
    """
)


def run_without_puzzle(script: str, export, tmp_path) -> dict[str, torch.Tensor]:
    """Run `script` on `export` in a Python that cannot import puzzle; return the tensors it saved."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    run = subprocess.run(
        [sys.executable, "-I", "-c", script, str(export), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return load_file(str(tmp_path / "output.safetensors"))


def test_export_loads_without_puzzle_with_identical_logits(child, tmp_path):
    export = save_child(child, tmp_path / "export", tokenizer=tiny_tokenizer())
    ids = torch.randint(4, TINY_VOCAB, (2, 12))
    save_file({"input_ids": ids}, str(tmp_path / "input.safetensors"))
    out = run_without_puzzle(ROUND_TRIP, export, tmp_path)
    with torch.no_grad():
        expected = child(ids).logits
    assert torch.equal(out["logits"], expected)
    assert torch.equal(out["tokens"], child.generate(ids[:, :6], max_new_tokens=8, do_sample=False))
    assert out["encoded"].tolist() == [5, 6, 7]


def test_exported_demo_shaped_child_generates_the_same_with_and_without_the_cache_without_puzzle(tmp_path):
    child = tiny_demo_child()
    export = save_child(child, tmp_path / "export")
    prompt = torch.randint(4, TINY_VOCAB, (2, 7))
    save_file({"prompt": prompt}, str(tmp_path / "input.safetensors"))
    out = run_without_puzzle(CACHED_GENERATION, export, tmp_path)
    assert torch.equal(out["cached"], out["uncached"])
    assert out["cache_length"].item() == 7 + 15  # one cache, grown by every step but the last token's
    assert len(set(out["uncached"][0, 7:].tolist())) > 3  # a dropped cache makes the child repeat one token
    assert torch.equal(out["uncached"], child.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=False))
    with torch.no_grad():
        full = child(prompt).logits
    torch.testing.assert_close(out["steps_cache"], full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["steps_past_key_values"], full, atol=1e-5, rtol=1e-5)


def test_export_layout_and_decilm_config(child, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="puzzle.hf.export"):
        export = save_child(child, tmp_path / "export")
    assert "replace_with_linear subblocks in layers [1, 2]" in caplog.text
    names = set(os.listdir(export))
    shipped = {"model.safetensors", "config.json", "modeling_puzzle.py", "configuration_puzzle.py", "block_config.py"}
    assert shipped <= names
    assert not any(name.endswith((".bin", ".pt")) for name in names)
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas"
    assert config["architectures"] == ["DeciLMForCausalLM"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_puzzle.PuzzleConfig",
        "AutoModelForCausalLM": "modeling_puzzle.PuzzleForCausalLM",
    }
    blocks = config["block_configs"]
    assert [b["attention"]["no_op"] for b in blocks] == [True, False, False, False]
    assert [b["attention"]["n_heads_in_group"] for b in blocks] == [None, 4, None, 1]
    assert [b["ffn"].get("intermediate_size") for b in blocks] == [40, None, None, 24]
    assert blocks[2]["attention"]["replace_with_linear"] and blocks[1]["ffn"]["replace_with_linear"]
    # Widths 40 and 24 are no multiples of 256: no ffn_mult for them; null for the linear and no-op FFNs.
    assert [b["ffn"].get("ffn_mult", "-") for b in blocks] == ["-", None, None, "-"]
    weights = load_file(str(export / "model.safetensors"))
    assert weights["model.layers.1.self_attn.k_proj.weight"].shape == (8, 32)  # 4 heads per group: 1 KV head
    assert weights["model.layers.3.self_attn.k_proj.weight"].shape == (32, 32)
    assert "model.layers.2.self_attn.linear_attn.weight" in weights
    assert not any(k.startswith("model.layers.0.self_attn") for k in weights)


def test_export_reloads_in_puzzle_without_remote_code(child, tmp_path):
    export = save_child(child, tmp_path / "export")
    ids = torch.randint(4, TINY_VOCAB, (1, 10))
    with torch.no_grad():
        expected = child(ids).logits
        auto = AutoModelForCausalLM.from_pretrained(export).eval()  # registered by `import puzzle`
        assert type(auto) is PuzzleForCausalLM
        assert torch.equal(auto(ids).logits, expected)
        resumed = load_parent(export)
        assert torch.equal(resumed(ids).logits, expected)
    assert resumed.config.block_configs == child.config.block_configs


def test_converted_parent_exports_with_its_tokenizer_dir(tmp_path):
    parent_dir = save_tiny_parent(tmp_path, "qwen2")
    parent = load_parent(parent_dir)
    export = save_child(parent, tmp_path / "export", tokenizer=parent_dir)
    assert (export / "tokenizer.json").read_bytes() == (parent_dir / "tokenizer.json").read_bytes()
    reloaded = load_parent(export)
    assert reloaded.config.qkv_bias is True and reloaded.config.attention_bias is False
    ids = torch.randint(4, TINY_VOCAB, (1, 10))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, parent(ids).logits)


def test_failed_export_leaves_nothing_half_written(child, tmp_path):
    target = tmp_path / "export"
    with pytest.raises(PuzzleError, match="has none of tokenizer.json"):
        save_child(child, target, tokenizer=tmp_path)  # tmp_path holds no tokenizer files
    assert os.listdir(tmp_path) == []
    save_child(child, target)
    before = (target / "model.safetensors").read_bytes()
    with pytest.raises(PuzzleError):
        save_child(child, target, tokenizer=tmp_path / "missing")
    assert (target / "model.safetensors").read_bytes() == before  # the finished export is untouched
    assert sorted(os.listdir(tmp_path)) == ["export"]


def test_export_replaces_an_existing_export(child, tmp_path):
    target = tmp_path / "export"
    save_child(child, target)
    (target / "stale.txt").write_text("from an older run")
    with torch.no_grad():
        child.lm_head.weight.add_(1.0)
    save_child(child, target)
    assert not (target / "stale.txt").exists()
    assert torch.equal(load_file(str(target / "model.safetensors"))["lm_head.weight"], child.lm_head.weight)
