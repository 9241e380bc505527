"""Serving engines: ffn_mult, the search space restricted to target.engines, and `puzzle check-export` verdicts."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tiny import TINY_VOCAB

from puzzle import cli
from puzzle.config import TargetConfig
from puzzle.config.search_space import ParentShape, SearchSpace
from puzzle.errors import ConfigError
from puzzle.hf.engines import ENGINES, check_config, check_export, engines_named
from puzzle.hf.export import save_child
from puzzle.model.block_config import ffn_mult_for, ffn_mult_to_intermediate_size
from puzzle.model.configuration_puzzle import PuzzleConfig
from puzzle.model.modeling_puzzle import PuzzleForCausalLM

# The demo parent's shape: hidden 128, 4 heads of 64, 2 KV heads, FFN 512.
DEMO = ParentShape(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=512)  # fmt: skip
ALL = list(ENGINES)


@pytest.mark.parametrize("hidden", [128, 576, 4096, 8192])
def test_ffn_mult_reproduces_every_multiple_of_256(hidden):
    for width in range(256, 8 * hidden + 1, 256):
        mult = ffn_mult_for(width, hidden)
        assert mult is not None and ffn_mult_to_intermediate_size(mult, hidden) == width
        assert len(repr(mult)) <= 10  # a short decimal, not 5.333333333333333


def test_ffn_mult_known_values_and_widths_it_cannot_express():
    assert ffn_mult_for(14336, 4096) == 5.25  # Llama-3.1-8B
    assert ffn_mult_for(512, 128) == 6.0 and ffn_mult_for(256, 128) == 3.0
    assert ffn_mult_for(1536, 576) == 4.0  # SmolLM2-135M
    for width in (128, 200, 384, 1408):
        assert ffn_mult_for(width, 128) is None


def space(d: dict, engines: tuple[str, ...] = ()) -> SearchSpace:
    return dataclasses.replace(SearchSpace.from_dict(d, source="t.yaml"), engines=engines)


DEMO_SPACE = {"attention": {"kv_heads": [1], "linear": True, "no_op": True},
              "ffn": {"fractions": [0.5, 0.25], "linear": True, "no_op": True}}  # fmt: skip


def names(variants) -> list[str]:
    return [v.name for v in variants]


def test_engines_restrict_the_search_space():
    free = space(DEMO_SPACE)
    assert names(free.attention_variants(DEMO, 0)) == ["attn_group2", "attn_group4", "attn_linear", "attn_no_op"]
    assert names(free.ffn_variants(DEMO, 0)) == ["ffn_512", "ffn_256", "ffn_128", "ffn_linear", "ffn_no_op"]
    # vLLM reads intermediate_size: every width stays, linear subblocks go.
    vllm = space(DEMO_SPACE, ("vllm",))
    assert names(vllm.attention_variants(DEMO, 0)) == ["attn_group2", "attn_group4", "attn_no_op"]
    assert names(vllm.ffn_variants(DEMO, 0)) == ["ffn_512", "ffn_256", "ffn_128", "ffn_no_op"]
    # llama.cpp serves linear attention but not linear FFN, and reads only ffn_mult (multiples of 256).
    llamacpp = space(DEMO_SPACE, ("llamacpp",))
    assert names(llamacpp.attention_variants(DEMO, 0)) == ["attn_group2", "attn_group4", "attn_linear", "attn_no_op"]
    assert names(llamacpp.ffn_variants(DEMO, 0)) == ["ffn_512", "ffn_256", "ffn_no_op"]
    both = space(DEMO_SPACE, ("vllm", "llamacpp"))
    # llama.cpp's graph drops a layer's attention output when its FFN is a no-op, and aborts on a last layer without
    # one: of the 3 x 3 pairs, a no-op FFN stays only behind a no-op attention, and not at all in the last layer.
    variants = both.enumerate(DEMO)
    assert [len(v) for v in variants] == [7, 7, 7, 6]
    assert [b.name for b in variants[0] if b.ffn.no_op] == ["attn_no_op+ffn_no_op"]
    assert not any(b.ffn.no_op for b in variants[-1])
    assert set(both.removed_by_engines(DEMO)) == {
        "attn_linear", "ffn_128", "ffn_linear", "attn_group2+ffn_no_op", "attn_group4+ffn_no_op", "attn_no_op+ffn_no_op"
    }  # fmt: skip
    # TensorRT-LLM serves linear FFNs; mlx-lm's model file has them under other weight names than an export's.
    assert "ffn_linear" in names(space(DEMO_SPACE, ("tensorrt_llm",)).ffn_variants(DEMO, 0))
    assert "ffn_linear" not in names(space(DEMO_SPACE, ("mlx_lm",)).ffn_variants(DEMO, 0))


def test_an_engine_that_cannot_serve_the_parent_block_is_refused():
    odd = ParentShape(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=352)  # fmt: skip
    space(DEMO_SPACE, ("vllm",)).validate(odd)  # vLLM reads intermediate_size
    for engine in ("llamacpp", "sglang"):
        with pytest.raises(ConfigError, match=rf"cannot serve the parent's own block \(FFN width 352.*{engine}"):
            space(DEMO_SPACE, (engine,)).enumerate(odd)


def test_target_engines_are_validated():
    assert TargetConfig(engines=["vllm", "llamacpp"]).engines == ["vllm", "llamacpp"]
    with pytest.raises(ConfigError, match="unknown engine 'vvlm'"):
        TargetConfig(engines=["vvlm"])
    with pytest.raises(ConfigError, match="names an engine twice"):
        TargetConfig(engines=["vllm", "vllm"])


# ---------------------------------------------------------------- check-export


def child(blocks: list[dict], hidden: int = 256, ffn: int = 512) -> PuzzleForCausalLM:
    """Four heads of 64: on the default residual of 256 head_dim is hidden / heads; the demo's residual is 128."""
    config = PuzzleConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=len(blocks),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=32,
        block_configs=blocks,
    )
    torch.manual_seed(0)
    return PuzzleForCausalLM(config).eval()


# A child the demo's search can build with target.engines [vllm, llamacpp]: widths 512 and 256, a no-op attention and
# a layer with both subblocks no-op (llama.cpp serves a no-op FFN only there, and not in the last layer).
DEMO_CHILD = [
    {"attention": {"n_heads_in_group": 2}, "ffn": {"intermediate_size": 512}},
    {"attention": {"no_op": True}, "ffn": {"intermediate_size": 256}},
    {"attention": {"no_op": True}, "ffn": {"no_op": True}},
    {"attention": {"n_heads_in_group": 4}, "ffn": {"intermediate_size": 256}},
]
NO_OP_FFNS = [DEMO_CHILD[0], {"attention": {"n_heads_in_group": 2}, "ffn": {"no_op": True}},
              {"attention": {"no_op": True}, "ffn": {"no_op": True}}]  # fmt: skip
LINEAR_FFN = [DEMO_CHILD[0], {"attention": {"n_heads_in_group": 2}, "ffn": {"replace_with_linear": True}}]
ODD_WIDTH = [DEMO_CHILD[0], {"attention": {"n_heads_in_group": 2}, "ffn": {"intermediate_size": 200}}]
LINEAR_ATTENTION = [DEMO_CHILD[0], {"attention": {"replace_with_linear": True}, "ffn": {"intermediate_size": 256}}]


def verdicts(export) -> dict[str, tuple[str, ...]]:
    return {v.engine.name: v.problems for v in check_export(export, engines_named(ALL))}


def test_export_writes_ffn_mult_where_the_width_allows(tmp_path):
    export = save_child(child(DEMO_CHILD + ODD_WIDTH[1:]), tmp_path / "export")
    blocks = json.loads((export / "config.json").read_text())["block_configs"]
    # ffn_mult alone where it expresses the width (mlx-lm rejects intermediate_size), null for a no-op FFN (llama.cpp
    # reads the key in every layer), intermediate_size alone for a width it cannot express.
    assert [b["ffn"].get("ffn_mult", "-") for b in blocks] == [3.0, 1.5, None, 1.5, "-"]
    assert [b["ffn"].get("intermediate_size", "-") for b in blocks] == ["-", "-", "-", "-", 200]
    reloaded = PuzzleForCausalLM.from_pretrained(export)  # puzzle itself still reads the exact width
    assert [reloaded.config.block_config(i).ffn.intermediate_size for i in range(5)] == [512, 256, None, 256, 200]
    # The config objects vLLM, SGLang and TensorRT-LLM read (trust_remote_code) carry ffn_mult only where it is exact.
    assert [getattr(b.ffn, "ffn_mult", "-") for b in reloaded.config.block_configs] == [3.0, 1.5, "-", 1.5, "-"]


def test_check_export_demo_child_loads_everywhere(tmp_path):
    export = save_child(child(DEMO_CHILD), tmp_path / "export")
    assert verdicts(export) == {name: () for name in ALL}


def test_check_export_demo_shape_does_not_load_in_mlx_lm(tmp_path):
    """The demo's parent has four heads of 64 on a residual of 128; mlx-lm sizes attention from hidden / heads."""
    export = save_child(child(DEMO_CHILD, hidden=128), tmp_path / "export")
    got = verdicts(export)
    assert got["mlx_lm"] == ("head_dim 64 is not hidden_size / num_attention_heads = 32 (mlx-lm sizes attention from "
                             "the latter)",)  # fmt: skip
    assert all(got[name] == () for name in ALL if name != "mlx_lm")
    llamacpp = check_export(export, engines_named(["llamacpp"]))[0]
    assert llamacpp.loads and "writes hidden / heads = 32 as the head size, not head_dim 64" in llamacpp.line()
    with pytest.raises(ConfigError, match="mlx-lm cannot serve the parent's own block"):
        space(DEMO_SPACE, ("mlx_lm",)).enumerate(dataclasses.replace(DEMO, head_dim=64))


def test_check_export_linear_ffn(tmp_path):
    export = save_child(child(LINEAR_FFN), tmp_path / "export")
    got = verdicts(export)
    for name in ("vllm", "sglang", "llamacpp", "mlx_lm"):
        assert got[name] == ("layer 1: a linear FFN (replace_with_linear)",), name
    assert got["tensorrt_llm"] == ()


def test_check_export_linear_attention(tmp_path):
    export = save_child(child(LINEAR_ATTENTION), tmp_path / "export")
    got = verdicts(export)
    assert got["vllm"] == got["sglang"] == got["mlx_lm"] == ("layer 1: a linear attention (replace_with_linear)",)
    assert got["llamacpp"] == got["tensorrt_llm"] == ()


def test_check_export_no_op_ffns_for_llamacpp(tmp_path):
    export = save_child(child(NO_OP_FFNS), tmp_path / "export")
    got = verdicts(export)
    assert got["llamacpp"] == (
        "layer 1: a no-op FFN after a real attention (llama.cpp drops that layer's attention output)",
        "layer 2: a no-op FFN in the last layer (llama.cpp aborts)",
    )
    assert all(got[name] == () for name in ALL if name != "llamacpp")


def test_check_export_odd_width(tmp_path):
    export = save_child(child(ODD_WIDTH), tmp_path / "export")
    got = verdicts(export)
    assert got["vllm"] == ()  # reads intermediate_size
    for name in ("sglang", "tensorrt_llm", "llamacpp"):
        assert got[name] == ("layer 1: FFN width 200, which ffn_mult cannot express (only multiples of 256)",)
    assert got["mlx_lm"] == (
        "layer 1: FFN key 'intermediate_size', which mlx-lm does not accept",
        "layer 1: FFN width 200, which ffn_mult cannot express (only multiples of 256)",
    )


def test_check_config_catches_a_stale_ffn_mult_and_a_foreign_checkpoint():
    base = {"hidden_size": 128, "num_attention_heads": 4, "architectures": ["DeciLMForCausalLM"],
            "model_type": "nemotron-nas"}  # fmt: skip
    stale = {**base, "block_configs": [{"attention": {"n_heads_in_group": 2},
                                        "ffn": {"intermediate_size": 512, "ffn_mult": 3.0}}]}  # fmt: skip
    got = {v.engine.name: v.problems for v in check_config(stale, engines_named(ALL))}
    assert got["vllm"] == got["llamacpp"] == ("layer 0: ffn_mult=3.0 gives width 256, not intermediate_size=512",)
    mult_only = {**base, "block_configs": [{"attention": {"n_heads_in_group": 3}, "ffn": {"ffn_mult": 3.0}}]}
    got = {v.engine.name: v.problems for v in check_config(mult_only, engines_named(ALL))}
    assert got["mlx_lm"] == ("layer 0: n_heads_in_group=3 does not divide 4 attention heads",)
    llama = {**base, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "block_configs": []}
    got = {v.engine.name: v.problems for v in check_config(llama, engines_named(ALL))}
    assert got["vllm"] == ("architectures is ['LlamaForCausalLM'], not ['DeciLMForCausalLM']",)
    assert got["mlx_lm"] == ("model_type is 'llama', not 'nemotron-nas'",)


def test_check_export_cli_exit_codes(tmp_path, capsys):
    export = save_child(child(ODD_WIDTH), tmp_path / "export")
    assert cli.main(["check-export", str(export), "--engines", "vllm"]) == 0
    assert capsys.readouterr().out.strip() == "vllm          loads"
    assert cli.main(["check-export", str(export), "--engines", "vllm,llamacpp", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["vllm"]["loads"] and not out["llamacpp"]["loads"]
    assert cli.main(["check-export", str(tmp_path / "nowhere")]) == 2
    assert "cannot read config.json" in capsys.readouterr().err
    assert cli.main(["check-export", str(export), "--engines", "trt"]) == 2
    assert "unknown engine 'trt'" in capsys.readouterr().err
