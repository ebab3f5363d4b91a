import random

import numpy as np
import pytest
import torch

from vla_razor.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state


def test_round_trip_restores_tensors_and_rng(tmp_path):
    path = tmp_path / "run" / "last.pt"
    model = torch.nn.Linear(3, 2)
    save_checkpoint(path, {"model": model.state_dict(), "step": 7, "rng": rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(3))
    state = load_checkpoint(path)
    assert state["step"] == 7
    torch.testing.assert_close(state["model"]["weight"], model.weight.detach())
    set_rng_state(state["rng"])
    assert (random.random(), np.random.rand()) == expected[:2]
    torch.testing.assert_close(torch.rand(3), expected[2])
    assert not path.with_name("last.pt.partial").exists()


def test_missing_is_none_and_corrupt_raises(tmp_path):
    assert load_checkpoint(tmp_path / "absent.pt") is None
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="delete it"):
        load_checkpoint(bad)


def test_a_memory_mapped_look_reads_zip_and_legacy_files_and_names_a_damaged_ones_own_error(tmp_path):
    save_checkpoint(tmp_path / "new.pt", {"config": {"kind": "x"}, "weights": torch.arange(4)})
    looked = load_checkpoint(tmp_path / "new.pt", mmap=True)
    assert looked["config"] == {"kind": "x"} and torch.equal(looked["weights"], torch.arange(4))
    torch.save({"a": 1}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert load_checkpoint(tmp_path / "legacy.pt", mmap=True) == {"a": 1}
    (tmp_path / "bad.pt").write_text("garbage\n")
    with pytest.raises(CheckpointError, match=r"bad.pt is unreadable \(ValueError"):
        load_checkpoint(tmp_path / "bad.pt", mmap=True)
