"""Search spaces: parsing, enumeration against a parent, overrides, and every invalid-space error."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from puzzle.config.search_space import ParentShape, SearchSpace, ffn_width
from puzzle.errors import ConfigError
from puzzle.model.block_config import AttentionConfig, BlockConfig, FFNConfig

SPACES = Path(__file__).resolve().parents[1] / "search_space"

# A 70B-like shape (64 heads, 8 KV heads) and the demo-like tiny parent (6 heads, 2 KV heads).
BIG = ParentShape(num_hidden_layers=80, hidden_size=8192, num_attention_heads=64, num_key_value_heads=8,
                  intermediate_size=28672)  # fmt: skip
TINY = ParentShape(num_hidden_layers=8, hidden_size=384, num_attention_heads=6, num_key_value_heads=2,
                   intermediate_size=1024)  # fmt: skip

PAPER = {
    "attention": {"kv_heads": [8, 4, 2, 1], "kv_heads_of": 8, "linear": True, "no_op": True},
    "ffn": {"fractions": [1.0, 0.87, 0.75, 0.5, 0.25, 0.2, 0.1], "linear": True, "no_op": True},
}


def space(d: dict, source: str = "demo.yaml") -> SearchSpace:
    return SearchSpace.from_dict(d, source=source)


# ---------------------------------------------------------------- enumeration


def test_paper_space_has_54_variants_per_layer_on_8_kv_heads():
    s = space(PAPER)
    variants = s.enumerate(BIG)
    assert len(variants) == 80
    assert all(len(v) == 54 for v in variants)
    assert len(set(variants[0])) == 54
    groups = [a.n_heads_in_group for a in s.attention_variants(BIG, 0) if a.is_gqa]
    assert groups == [8, 16, 32, 64]  # 8, 4, 2, 1 KV heads of 64 query heads
    assert [f.intermediate_size for f in s.ffn_variants(BIG, 0) if f.is_mlp] == [
        28672, 24945, 21504, 14336, 7168, 5734, 2867
    ]  # fmt: skip


def test_kv_heads_scale_to_a_2_kv_head_parent_and_dedupe():
    s = space(PAPER)
    attention = s.attention_variants(TINY, 0)
    gqa = [a.num_key_value_heads(TINY.num_attention_heads) for a in attention if a.is_gqa]
    assert gqa == [2, 1]
    assert attention[-2:] == [AttentionConfig(replace_with_linear=True), AttentionConfig(no_op=True)]
    assert len(s.block_variants(TINY, 0)) == 4 * 9


def test_scaled_counts_round_down_to_a_divisor_of_the_parent_kv_heads():
    parent = ParentShape(4, 64, 12, 6, 128)  # 6 KV heads: 8/4/2/1 of 8 -> 6, 3, 1.5->1, 0.75->1
    gqa = [a.num_key_value_heads(12) for a in space(PAPER).attention_variants(parent, 0) if a.is_gqa]
    assert gqa == [6, 3, 1]


def test_parent_variant_is_first_even_when_the_space_omits_it():
    s = space({"attention": {"kv_heads": [1]}, "ffn": {"fractions": [0.5]}})
    blocks = s.block_variants(TINY, 2)
    assert blocks[0] == TINY.parent_block
    assert blocks[0] == BlockConfig(AttentionConfig(n_heads_in_group=3), FFNConfig(intermediate_size=1024))
    assert [b.name for b in blocks] == [
        "attn_group3+ffn_1024", "attn_group3+ffn_512", "attn_group6+ffn_1024", "attn_group6+ffn_512"
    ]  # fmt: skip


def test_missing_sections_mean_parent_only():
    assert space({}).enumerate(TINY) == [[TINY.parent_block]] * 8


def test_ffn_multiple_of_rounds_widths_but_keeps_the_parent_exact():
    s = space({"ffn": {"fractions": [1.0, 0.87, 0.1, 0.01]}, "ffn_multiple_of": 64})
    widths = [f.intermediate_size for f in s.ffn_variants(ParentShape(2, 64, 4, 2, 1000), 0)]
    assert widths == [1000, 896, 128, 64]  # 870 -> 896, 100 -> 128, 10 -> at least one multiple
    assert ffn_width(0.5, 64, 1) == 32
    assert ffn_width(0.99, 100, 64) == 100  # never wider than the parent


def test_widths_that_collide_after_rounding_are_merged():
    s = space({"ffn": {"fractions": [0.2, 0.1]}, "ffn_multiple_of": 8})
    widths = [f.intermediate_size for f in s.ffn_variants(ParentShape(2, 32, 4, 2, 16), 0)]
    assert widths == [16, 8]  # 3.2 and 1.6 both round to one multiple of 8


def test_absolute_kv_heads():
    s = space({"attention": {"kv_heads": [4, 2]}})
    parent = ParentShape(2, 64, 8, 4, 128)
    assert [a.num_key_value_heads(8) for a in s.attention_variants(parent, 0)] == [4, 2]


# ---------------------------------------------------------------- overrides


def test_keep_parent_and_negative_index_overrides():
    s = space({**PAPER, "layers": {0: {"keep_parent": True}, -1: {"ffn": {"fractions": [0.5]}}}})
    variants = s.enumerate(TINY)
    assert variants[0] == [TINY.parent_block]
    # The last layer: the global attention options (4) x its own FFN options (parent + 50%).
    assert len(variants[-1]) == 4 * 2
    assert {b.ffn for b in variants[-1]} == {FFNConfig(intermediate_size=1024), FFNConfig(intermediate_size=512)}
    assert all(len(v) == 36 for v in variants[1:-1])
    assert s.block_variants(TINY, -1) == variants[7]


def test_override_attention_section_replaces_the_global_one():
    s = space({**PAPER, "layers": {"3": {"attention": {"no_op": True}}}})
    assert s.attention_variants(TINY, 3) == [TINY.parent_attention, AttentionConfig(no_op=True)]
    assert len(s.ffn_variants(TINY, 3)) == 9


def test_keep_parent_false_changes_nothing():
    s = space({**PAPER, "layers": {1: {"keep_parent": False}}})
    assert s.block_variants(TINY, 1) == s.block_variants(TINY, 2)


def test_num_candidates():
    assert space(PAPER).num_candidates(TINY) == 36**8


# ---------------------------------------------------------------- shipped YAMLs


SMOLLM2_135M = ParentShape(
    num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536
)
PARENT_OF_SPACE = {"smollm2_135m.yaml": (SMOLLM2_135M,)}


@pytest.mark.parametrize("path", sorted(SPACES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_space_loads_and_validates(path):
    assert path.read_text().startswith("#"), "each shipped space starts with a comment saying what it is"
    s = SearchSpace.load(path)
    assert s.source == path.name
    # A space written for one parent (absolute KV-head counts) is checked against that parent's shape.
    for parent in PARENT_OF_SPACE.get(path.name, (BIG, TINY)):
        s.validate(parent)
        variants = s.enumerate(parent)
        assert all(v[0] == parent.parent_block for v in variants)
        assert all(len(v) == len(set(v)) for v in variants)


def test_shipped_paper_and_demo_sizes():
    assert len(SearchSpace.load(SPACES / "puzzle_paper.yaml").block_variants(BIG, 0)) == 54
    demo = SearchSpace.load(SPACES / "demo.yaml").enumerate(TINY)
    assert all(len(v) == 12 for v in demo)
    # vLLM does not implement replace_with_linear, so the demo space never offers it.
    assert not any(b.attention.replace_with_linear or b.ffn.replace_with_linear for v in demo for b in v)


# ---------------------------------------------------------------- parent shape


def test_parent_shape_from_hf_config_and_dict():
    from transformers import LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96)  # fmt: skip
    assert ParentShape.from_config(cfg) == ParentShape(2, 64, 4, 2, 96, head_dim=getattr(cfg, "head_dim", None))
    mha = SimpleNamespace(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=None,
                          intermediate_size=96)  # fmt: skip
    assert ParentShape.from_config(mha).num_key_value_heads == 4
    expected = ParentShape(2, 64, 4, 4, 96, head_dim=getattr(mha, "head_dim", None))
    assert ParentShape.from_config(dict(vars(mha))) == expected


def test_parent_shape_errors():
    with pytest.raises(ConfigError, match="lacks intermediate_size"):
        ParentShape.from_config({"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4})
    with pytest.raises(ConfigError, match="num_key_value_heads=3 does not divide num_attention_heads=4"):
        ParentShape(2, 64, 4, 3, 96)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("d", "parent", "message"),
    [
        ({"attention": {"kv_heads": [8, 4, 3]}}, ParentShape(2, 64, 8, 8, 96),
         r"demo\.yaml: attention\.kv_heads\[2\]=3 does not divide the parent's 8 attention heads"),
        ({"attention": {"kv_heads": [4]}}, ParentShape(2, 64, 8, 2, 96),
         r"attention\.kv_heads\[0\]=4 exceeds the parent's 2 KV heads"),
        ({"attention": {"kv_heads": [3]}}, ParentShape(2, 64, 12, 4, 96),
         r"attention\.kv_heads\[0\]=3 does not divide the parent's 4 KV heads"),
        ({"attention": {"kv_heads": [16], "kv_heads_of": 8}}, BIG, r"kv_heads\[0\]=16 exceeds kv_heads_of=8"),
        ({"attention": {"kv_heads": [3], "kv_heads_of": 8}}, BIG, r"kv_heads\[0\]=3 does not divide kv_heads_of=8"),
        ({"layers": {8: {"keep_parent": True}}}, TINY, r"layers\.8 is out of range for a parent with 8 layers"),
        ({"layers": {-9: {"keep_parent": True}}}, TINY, r"layers\.-9 is out of range"),
        ({"layers": {7: {"keep_parent": True}, -1: {"keep_parent": True}}}, TINY,
         r"layers\.-1 and layers\.7 are the same layer"),
        ({"layers": {1: {"attention": {"kv_heads": [5]}}}}, TINY, r"layers\.1\.attention\.kv_heads\[0\]=5"),
    ],
)  # fmt: skip
def test_errors_that_depend_on_the_parent(d, parent, message):
    s = space(d)  # parses: the problem only shows against this parent
    with pytest.raises(ConfigError, match=message):
        s.validate(parent)
    with pytest.raises(ConfigError, match=message):
        s.enumerate(parent)


@pytest.mark.parametrize(
    ("d", "message"),
    [
        ({"ffn": {"fractions": [1.0, 0.0]}}, r"ffn\.fractions\[1\]=0\.0 is outside \(0, 1\]"),
        ({"ffn": {"fractions": [50]}}, r"ffn\.fractions\[0\]=50 is outside \(0, 1\]; write fractions"),
        ({"ffn": {"fractions": [-0.5]}}, r"fractions\[0\]=-0\.5 is outside"),
        ({"ffn": {"fractions": ["half"]}}, r"fractions\[0\]='half' is outside"),
        ({"ffn": {"fractions": []}}, r"ffn\.fractions is empty"),
        ({"attention": {"kv_heads": []}}, r"attention\.kv_heads is empty"),
        ({"ffn": {"fractions": [0.5, 0.25, 0.5]}}, r"ffn\.fractions\[2\]=0\.5 duplicates ffn\.fractions\[0\]"),
        ({"attention": {"kv_heads": [2, 2]}}, r"attention\.kv_heads\[1\]=2 duplicates"),
        ({"attention": {"kv_heads": [0]}}, r"kv_heads\[0\]=0 must be an integer >= 1"),
        ({"attention": {"kv_heads": [True]}}, r"kv_heads\[0\]=True must be an integer"),
        ({"attention": {"kv_heads": [1], "kv_heads_of": 0}}, r"kv_heads_of=0 must be"),
        ({"attention": {"linear": "yes please"}}, r"attention\.linear='yes please' must be true or false"),
        ({"attention": {"n_kv_heads": [1]}}, r"unknown key attention\.n_kv_heads"),
        ({"ffn": {"fraction": [0.5]}}, r"unknown key ffn\.fraction"),
        ({"atention": {}}, r"demo\.yaml: unknown key atention \(known: attention"),
        ({"layers": {0: {"keep": True}}}, r"unknown key layers\.0\.keep"),
        ({"layers": {0: {"keep_parent": True, "ffn": {}}}}, r"layers\.0 has keep_parent with attention/ffn"),
        ({"layers": {"first": {"keep_parent": True}}}, r"layers key 'first' is not a layer index"),
        ({"layers": {0: {"ffn": {"fractions": [2]}}}}, r"layers\.0\.ffn\.fractions\[0\]=2 is outside"),
        ({"layers": [0]}, r"layers must be a mapping, got list"),
        ({"attention": [1, 2]}, r"attention must be a mapping, got list"),
        ({"ffn_multiple_of": 0}, r"ffn_multiple_of=0 must be an integer >= 1"),
        ([1, 2], r"demo\.yaml: the top level must be a mapping, got list"),
        (None, r"the top level must be a mapping, got empty"),
    ],
)  # fmt: skip
def test_structural_errors(d, message):
    with pytest.raises(ConfigError, match=message):
        space(d)


def test_out_of_range_layer_index_in_a_query():
    with pytest.raises(ConfigError, match="layer index 8 is out of range"):
        space(PAPER).block_variants(TINY, 8)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read it"):
        SearchSpace.load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="cannot read it"):
        SearchSpace.load(tmp_path)  # a directory
    bad = tmp_path / "bad.yaml"
    bad.write_text("attention: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML"):
        SearchSpace.load(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match=r"scalar\.yaml: the top level must be a mapping, got str"):
        SearchSpace.load(scalar)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="got empty"):
        SearchSpace.load(empty)
