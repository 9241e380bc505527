"""puzzle.common.checkpoint, the tensor file of BLD's block checkpoints and of GKD's checkpoint weights: the files
keep the formats both wrote before (a JSON record under the header key "meta" for BLD, no header record for GKD)."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from puzzle.common.checkpoint import load_state, save_state


def test_a_record_and_tied_tensors_round_trip_in_the_old_layout(tmp_path):
    shared = torch.arange(6.0).reshape(2, 3)
    # Tied tensors (one storage), which safetensors refuses unless save_state copies them.
    tensors = {"embed": shared, "head": shared, "step": torch.tensor([3])}
    path = tmp_path / "ckpt.safetensors"
    save_state(path, tensors, {"step": 3, "loss": 0.5})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"meta": json.dumps({"step": 3, "loss": 0.5})}  # what BLD's loader reads
    loaded, meta = load_state(path)
    assert meta == {"step": 3, "loss": 0.5} and loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert not [p.name for p in tmp_path.iterdir() if p.name != path.name]  # no temporary left behind


def test_without_a_record_the_header_holds_none(tmp_path):
    path = tmp_path / "model.safetensors"
    save_state(path, {"w": torch.ones(2)})
    with safe_open(str(path), framework="pt") as f:
        assert not f.metadata()
    assert load_state(path)[1] is None


def test_views_of_one_storage_are_written_from_copies_and_the_rest_as_they_are(tmp_path, monkeypatch):
    """Slices of one tensor (which safetensors refuses side by side) round-trip; a plain tensor is not copied."""
    import puzzle.common.checkpoint as checkpoint

    whole = torch.arange(12.0)
    plain = torch.ones(3, 4)
    written = {}

    def spy(path, tensors, metadata):
        written.update(tensors)
        return real(path, tensors, metadata)

    real = checkpoint.save_safetensors_atomic
    monkeypatch.setattr(checkpoint, "save_safetensors_atomic", spy)
    save_state(tmp_path / "w.safetensors", {"a": whole[:6], "b": whole[6:], "plain": plain})
    assert written["plain"].data_ptr() == plain.data_ptr()
    tensors, _ = load_state(tmp_path / "w.safetensors")
    assert torch.equal(tensors["a"], whole[:6]) and torch.equal(tensors["b"], whole[6:])
