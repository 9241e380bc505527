"""Data layer: every corpus kind, the split guarantee, packing, caching and each bad input's error."""

from __future__ import annotations

import json
import random

import pytest
import torch

from puzzle.errors import ConfigError, PuzzleError
from puzzle.stages.data import (
    SPLITS,
    DataConfig,
    Document,
    _doc_hash,
    batches,
    build_splits,
    load_documents,
    split_documents,
    stdlib_root,
)
from puzzle.stages.parent import train_tokenizer

WORDS = "def class return self value index items result None import for while if else data list".split()


def _text(i: int, words: int = 120) -> str:
    rng = random.Random(i)
    lines = [f"def f{i}(x):"] + [f"    {' '.join(rng.choices(WORDS, k=6))}" for _ in range(words // 6)]
    return "\n".join(lines) + "\n"


@pytest.fixture
def corpus_dir(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(24):
        (root / ("sub" if i % 3 == 0 else "") / f"doc{i:02d}.txt").write_text(_text(i))
    return root


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([Document(str(i), _text(i)) for i in range(30)], vocab_size=300)


def _files_cfg(root, **kw) -> DataConfig:
    return DataConfig(source="files", paths=str(root / "**" / "*.txt"), **kw)


# ----------------------------------------------------------------------------------------------- corpora


def test_files_glob_reads_every_matching_file_once_sorted(corpus_dir):
    docs = load_documents(DataConfig(source="files", paths=[str(corpus_dir / "**/*.txt"), str(corpus_dir / "*.txt")]))
    assert len(docs) == 24  # the second glob overlaps the first: no duplicates
    assert [d.id for d in docs] == sorted(d.id for d in docs)
    by_name = {d.id.rsplit("/", 1)[-1]: d.text for d in docs}
    assert by_name["doc03.txt"] == _text(3)


def test_max_documents_keeps_the_first_non_empty_documents_in_hash_order(corpus_dir):
    (corpus_dir / "empty.txt").write_text("")
    full = load_documents(_files_cfg(corpus_dir))
    expected = sorted(sorted(full, key=lambda d: _doc_hash(d.id, 0))[:5], key=lambda d: d.id)
    assert load_documents(_files_cfg(corpus_dir, max_documents=5)) == expected


def test_jsonl_reads_the_configured_text_field(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"body": _text(i), "n": i} for i in range(5)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # a blank line is skipped
    docs = load_documents(DataConfig(source="jsonl", paths=str(path), text_field="body"))
    assert [d.text for d in docs] == [r["body"] for r in rows]
    assert docs[0].id == f"{path}:1"


@pytest.mark.parametrize("builder", ["json", "text"])
def test_hf_source_loads_local_files_offline(tmp_path, builder):
    if builder == "json":
        path = tmp_path / "rows.jsonl"
        path.write_text("\n".join(json.dumps({"text": _text(i)}) for i in range(4)) + "\n")
        expected = [_text(i) for i in range(4)]
    else:  # the "text" builder yields one record per line
        path = tmp_path / "lines.txt"
        expected = [f"line {i} of plain text" for i in range(6)]
        path.write_text("\n".join(expected) + "\n")
    docs = load_documents(DataConfig(source="hf", hf_path=builder, paths=str(path)))
    assert sorted(d.text for d in docs) == sorted(expected)
    assert docs[0].id.startswith(f"{builder}/default/train:")


def test_hf_saved_dataset_dir_and_local_data_dir(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"content": [_text(i) for i in range(3)]}).save_to_disk(str(tmp_path / "saved"))
    saved = load_documents(DataConfig(source="hf", hf_path=str(tmp_path / "saved"), text_field="content"))
    assert [d.text for d in saved] == [_text(i) for i in range(3)]
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "part.jsonl").write_text("\n".join(json.dumps({"text": _text(i)}) for i in range(2)) + "\n")
    assert len(load_documents(DataConfig(source="hf", hf_path=str(tmp_path / "dir")))) == 2


def test_stdlib_corpus_with_max_documents():
    cfg = DataConfig(max_documents=5)
    docs = load_documents(cfg)
    assert len(docs) == 5
    assert docs == load_documents(cfg)  # deterministic
    for doc in docs:
        assert doc.id.endswith(".py") and (stdlib_root() / doc.id).is_file()
        assert not {"test", "tests", "site-packages"} & set(doc.id.split("/"))
        assert doc.text.strip()
    # the cap samples by hash, not the alphabetically first files
    everything = load_documents(DataConfig())
    assert len(everything) > 100
    assert [d.id for d in docs] != [d.id for d in everything[:5]]


# ----------------------------------------------------------------------------------------------- splits


def test_splits_are_disjoint_complete_and_deterministic():
    docs = [Document(f"file{i}.py", "x") for i in range(200)]
    cfg = DataConfig()
    parts = split_documents(docs, cfg)
    ids = {name: {d.id for d in part} for name, part in parts.items()}
    assert set(parts) == set(SPLITS)
    assert sum(len(v) for v in ids.values()) == len(docs) == len(set().union(*ids.values()))
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not ids[a] & ids[b], (a, b)
    assert all(len(parts[name]) >= 1 for name in SPLITS)
    assert abs(len(parts["test"]) - 0.05 * 200) <= 1
    # the same ids in another order land in the same splits; another seed moves them
    shuffled = split_documents(list(reversed(docs)), cfg)
    assert {n: {d.id for d in p} for n, p in shuffled.items()} == ids
    reseeded = split_documents(docs, DataConfig(seed=1))
    assert {d.id for d in reseeded["test"]} != ids["test"]


def test_zero_fraction_split_is_empty():
    cfg = DataConfig(calibration_fraction=0.0, train_fraction=0.91)
    parts = split_documents([Document(str(i), "x") for i in range(20)], cfg)
    assert parts["calibration"] == [] and len(parts["train"]) >= 17


def test_too_few_documents_for_the_splits():
    with pytest.raises(PuzzleError, match="3 documents but 4 splits"):
        split_documents([Document(str(i), "x") for i in range(3)], DataConfig())


# ----------------------------------------------------------------------------------------------- packing


def test_build_splits_packs_fixed_length_rows_from_each_split(corpus_dir, tokenizer, tmp_path):
    cfg = _files_cfg(
        corpus_dir, seq_len=16, calibration_fraction=0.1, train_fraction=0.7, validation_fraction=0.1, test_fraction=0.1
    )
    splits = build_splits(cfg, tokenizer, max_positions=16, vocab_size=300, cache_dir=tmp_path / "cache")
    assert set(splits) == set(SPLITS)
    for ds in splits.values():
        assert len(ds) > 0
        rows = next(batches(ds, 4))
        assert rows.dtype == torch.long and rows.shape == (min(4, len(ds)), 16)
        assert int(rows.max()) < len(tokenizer)
    # rows are the documents' tokens, concatenated with the separator, in order
    parts = split_documents(load_documents(cfg), cfg)
    stream = []
    for doc in parts["test"]:
        stream += tokenizer(doc.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    packed = torch.cat(list(batches(splits["test"], 100))).flatten().tolist()
    assert packed == stream[: len(packed)] and len(stream) - len(packed) < 16


def test_build_splits_second_call_is_served_from_cache(corpus_dir, tokenizer, tmp_path, monkeypatch):
    cfg = _files_cfg(corpus_dir, seq_len=16)
    first = build_splits(cfg, tokenizer, cache_dir=tmp_path / "cache")
    assert any((tmp_path / "cache").glob("train-pack16-*.arrow"))
    calls = []
    original = type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    second = build_splits(cfg, tokenizer, cache_dir=tmp_path / "cache")
    assert calls == []  # nothing was tokenised again
    assert second["train"]["input_ids"] == first["train"]["input_ids"]


def test_batches_shuffle_max_tokens_and_cover_each_row_once(corpus_dir, tokenizer, tmp_path):
    ds = build_splits(_files_cfg(corpus_dir, seq_len=8), tokenizer, cache_dir=tmp_path / "cache")["train"]
    plain = torch.cat(list(batches(ds, 5)))
    assert plain.shape == (len(ds), 8)
    shuffled = torch.cat(list(batches(ds, 5, shuffle=True, seed=3)))
    assert not torch.equal(shuffled, plain)
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, plain.tolist()))
    assert torch.equal(shuffled, torch.cat(list(batches(ds, 5, shuffle=True, seed=3))))
    capped = list(batches(ds, 4, max_tokens=8 * 6 + 1))
    assert sum(b.numel() for b in capped) == 8 * 7 and [len(b) for b in capped] == [4, 3]


# ----------------------------------------------------------------------------------------------- errors


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(ConfigError, match=r"glob '.*nothing-here/\*\.txt' matches no files"):
        load_documents(DataConfig(source="files", paths=str(tmp_path / "nothing-here/*.txt")))


def test_empty_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("  \n")
    with pytest.raises(PuzzleError, match="no non-empty documents"):
        load_documents(DataConfig(source="files", paths=str(tmp_path / "*.txt")))


def test_corpus_without_tokens(corpus_dir, tmp_path):
    class Silent:  # a tokenizer that produces nothing for any text
        eos_token_id = bos_token_id = None

        def __len__(self):
            return 10

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[] for _ in texts]}

    with pytest.raises(PuzzleError, match="tokenises to no tokens"):
        build_splits(_files_cfg(corpus_dir, seq_len=8), Silent(), cache_dir=tmp_path / "cache")


def test_missing_text_field_names_the_fields_present(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"content": "x", "meta": 1}) + "\n")
    with pytest.raises(
        ConfigError, match=r"text field 'text' missing at .*data.jsonl:1; fields present: \['content', 'meta'\]"
    ):
        load_documents(DataConfig(source="jsonl", paths=str(path)))
    with pytest.raises(
        ConfigError, match=r"text field 'text' not in dataset 'json'; its fields are \['content', 'meta'\]"
    ):
        load_documents(DataConfig(source="hf", hf_path="json", paths=str(path)))


def test_invalid_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(PuzzleError, match=r"bad.jsonl:2 is not valid JSON"):
        load_documents(DataConfig(source="jsonl", paths=str(path)))


def test_seq_len_above_max_positions(corpus_dir, tokenizer, tmp_path):
    with pytest.raises(ConfigError, match=r"data.seq_len=64 exceeds the parent's max_position_embeddings=32"):
        build_splits(_files_cfg(corpus_dir, seq_len=64), tokenizer, max_positions=32, cache_dir=tmp_path)


def test_tokenizer_larger_than_the_parent_vocabulary(corpus_dir, tokenizer, tmp_path):
    with pytest.raises(ConfigError, match=r"tokenizer has 300 tokens but the parent's vocab_size is 256"):
        build_splits(_files_cfg(corpus_dir, seq_len=8), tokenizer, vocab_size=256, cache_dir=tmp_path)


def test_split_too_small_for_one_sequence(corpus_dir, tokenizer, tmp_path):
    with pytest.raises(
        PuzzleError, match=r"split '(calibration|validation|test)' \(1 documents, \d+ tokens\) yields no"
    ):
        build_splits(_files_cfg(corpus_dir, seq_len=512), tokenizer, cache_dir=tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": "web"}, "data.source='web' is not one of"),
        ({"source": "files"}, "needs data.paths"),
        ({"source": "hf"}, "needs data.hf_path"),
        ({"seq_len": 1}, "data.seq_len=1 must be at least 2"),
        ({"test_fraction": 0.5}, "sum to 1.45"),
        ({"train_fraction": 0.0, "test_fraction": 0.94}, "data.train_fraction=0.0 must be positive"),
        ({"max_documents": 0}, "data.max_documents=0"),
    ],
)
def test_data_config_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(**kwargs)


def test_data_config_round_trips_and_rejects_unknown_keys():
    cfg = DataConfig(source="jsonl", paths=["a.jsonl"], seq_len=64)
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown data config keys"):
        DataConfig.from_dict({"seqlen": 3})
