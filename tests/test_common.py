"""puzzle.common: atomic writes leave no partial file, the resource check's one message format, token rows and their
seeded order."""

from __future__ import annotations

import json

import pytest
import torch

from puzzle.common.atomic import (
    atomic_dir,
    atomic_file,
    link_atomic,
    save_safetensors_atomic,
    write_atomic,
    write_json_atomic,
)
from puzzle.common.resources import check_resources
from puzzle.common.rows import shuffled_rows, token_rows
from puzzle.errors import ConfigError

# ------------------------------------------------------------------------------------------------ atomic writes


def test_atomic_write_replaces_whole_files(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_json_atomic(path, {"b": 1, "a": [1, 2]})  # creates the parent directory
    assert path.read_text() == json.dumps({"b": 1, "a": [1, 2]}, indent=1)
    write_json_atomic(path, {"b": 1, "a": 2}, indent=2, sort_keys=True, end="\n")
    assert path.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    write_atomic(path, b"\x00raw")
    assert path.read_bytes() == b"\x00raw"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_atomic_write_leaves_no_partial_file_on_an_exception(tmp_path):
    path = tmp_path / "a.txt"
    write_atomic(path, "old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_file(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("disk full")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "b.json", {"x": Unserialisable()})
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_dir_replaces_a_directory_or_leaves_it_alone(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "y").write_text("2")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and [p.name for p in target.iterdir()] == ["x"]
    with atomic_dir(target, tmp=tmp_path / "out.tmp-1") as tmp:
        (tmp / "z").write_text("3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and [p.name for p in target.iterdir()] == ["z"]


def test_link_atomic_links_files_and_trees(tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("tree")
    (src / "g").write_text("file")
    link_atomic(src / "g", tmp_path / "out" / "g")
    assert (tmp_path / "out" / "g").stat().st_ino == (src / "g").stat().st_ino
    (tmp_path / "out" / "d").mkdir()
    (tmp_path / "out" / "d" / "stale").write_text("x")
    link_atomic(src / "d", tmp_path / "out" / "d")  # a directory replaces the old one whole
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["d", "g"]
    assert [p.name for p in (tmp_path / "out" / "d").iterdir()] == ["f"]


def test_save_safetensors_atomic(tmp_path):
    from safetensors import safe_open

    path = save_safetensors_atomic(tmp_path / "w.safetensors", {"a": torch.ones(2, 2).t()}, {"meta": "m"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"meta": "m"} and torch.equal(f.get_tensor("a"), torch.ones(2, 2))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


# ------------------------------------------------------------------------------------------------ resources


def test_resource_check_messages():
    check_resources({"bld.num_gpus": 0.5, "bld.num_cpus": 4}, {"CPU": 4.0, "GPU": 1.0})
    check_resources({"scoring.num_gpus": 0}, {"CPU": 1.0})  # asks for nothing
    with pytest.raises(
        ConfigError, match=r"^bld.num_gpus=0.5 but the Ray cluster has no GPUs; set bld.num_gpus=0 or use a cluster"
    ):
        check_resources({"bld.num_gpus": 0.5}, {"CPU": 8.0})
    with pytest.raises(ConfigError, match=r"^scoring.num_gpus=2 exceeds the Ray cluster's 1 GPU\(s\); lower scoring"):
        check_resources({"scoring.num_gpus": 2}, {"CPU": 8.0, "GPU": 1.0})
    with pytest.raises(
        ConfigError, match=r"^gkd.num_cpus=16 exceeds the Ray cluster's 8 CPU\(s\); lower gkd.num_cpus$"
    ):
        check_resources({"gkd.num_cpus": 16}, {"CPU": 8.0})
    with pytest.raises(
        ConfigError,
        match=r"^gkd.num_cpus=3 x 3 workers exceeds the Ray cluster.s 8 CPU\(s\); lower gkd.num_cpus or gkd.num_work",
    ):
        check_resources({"gkd.num_cpus": 3}, {"CPU": 8.0}, workers=3, workers_key="gkd.num_workers")


# ------------------------------------------------------------------------------------------------ token rows


def test_token_rows_from_tensors_lists_and_batches():
    expected = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert torch.equal(token_rows(expected.int()), expected) and token_rows(expected.int()).dtype == torch.long
    assert torch.equal(token_rows([[1, 2, 3], [4, 5, 6]]), expected)
    assert torch.equal(token_rows([expected[:1], expected[1]]), expected)  # a batch and a row
    assert torch.equal(token_rows(iter([expected[:1].tolist(), expected[1:].tolist()])), expected)
    for bad in ([], [1, 2, 3], torch.zeros(2, 0)):
        with pytest.raises(ConfigError, match=r"^train tokens must be a non-empty \[rows, seq_len\] array"):
            token_rows(bad, "train")


def test_shuffled_rows_walks_one_permutation_per_epoch():
    stream = torch.cat([shuffled_rows(start, 4, 10, 3, seed_stride=7) for start in range(0, 20, 4)])
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
    assert torch.equal(stream[6:14], shuffled_rows(6, 8, 10, 3, seed_stride=7))  # any window of the same stream
    assert not torch.equal(stream[:10], stream[10:])
    assert torch.equal(stream[:10], torch.randperm(10, generator=torch.Generator().manual_seed(3 * 7)))


def test_build_once_builds_under_a_lock_and_never_trusts_leftovers(tmp_path):
    from puzzle.common.atomic import build_once

    target = tmp_path / "cache" / "thing"
    target.mkdir(parents=True)
    (target / "half").write_text("an interrupted copy")  # no completion mark: must not survive
    stale = target.parent / ".thing-99999"
    stale.mkdir()
    built = []

    def build(tmp):
        assert tmp.parent == target.parent and tmp != target  # written beside, renamed into place
        (tmp / "done").write_text("ok")
        built.append(tmp)

    def complete(path):
        return (path / "done").is_file()

    assert build_once(target, build, complete) is True
    assert sorted(p.name for p in target.iterdir()) == ["done"] and not stale.exists()
    assert build_once(target, build, complete) is False and len(built) == 1

    def fail(tmp):
        (tmp / "partial").write_text("x")
        raise RuntimeError("killed")

    other = tmp_path / "cache" / "other"
    with pytest.raises(RuntimeError):
        build_once(other, fail, complete)
    assert not other.exists() and not list(other.parent.glob(".other-*"))  # nothing half-written left looking done
