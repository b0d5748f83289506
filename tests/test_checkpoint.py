"""The checkpoint format: round trips, and files that are not ours."""

import numpy as np
import pytest
import torch

import checkpoint
import models


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = models.build("airnet_xs", 4, 3).eval()
    model(torch.randn(8, 3, 32, 32))  # nothing changes in eval mode, but exercise it
    saved = {
        "format": checkpoint.FORMAT,
        "model": "airnet_xs",
        "num_classes": 4,
        "in_channels": 3,
        "classes": list("abcd"),
        "state_dict": model.state_dict(),
    }
    torch.save(saved, tmp_path / "c.pt")
    loaded = checkpoint.build_model(checkpoint.load(tmp_path / "c.pt")).eval()
    x = torch.randn(5, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))


def test_checkpoint_of_wrong_shape_is_a_readable_error(tmp_path):
    state = models.build("airnet_xs", 4, 3).state_dict()
    saved = {"model": "airnet_xs", "num_classes": 10, "in_channels": 3, "classes": list("abcd"), "state_dict": state}
    with pytest.raises(ValueError, match="do not fit"):
        checkpoint.build_model(saved)


def test_load_refuses_other_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"not a checkpoint written by train.py \(not a torch file\)"):
        checkpoint.load(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a checkpoint of this repo"):
        checkpoint.load(tmp_path / "other.pt")


def test_unreadable_files_get_a_short_reason_without_torchs_advice(tmp_path):
    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 16)  # torch would advise weights_only=False
    with pytest.raises(ValueError) as error:
        checkpoint.load(tmp_path / "random.pt")
    assert str(error.value) == "not a checkpoint written by train.py (not a torch file)"
    # torch.save's format before torch 1.6 (older published teachers) is a torch file too
    torch.save({"step": np.float64(1.0)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=r"\(it holds Python objects that a safe load refuses to build\)$"):
        checkpoint.load(tmp_path / "legacy.pt")
    # a file the system cannot read is said to be so, not judged by a content never read (which for a
    # .last.pt would invite deleting the progress)
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(checkpoint.Unreadable, match=r"^cannot read it \(Is a directory\)$"):
        checkpoint.load(tmp_path / "folder.pt")


def test_a_file_of_another_format_is_refused_naming_the_version_that_wrote_it(tmp_path):
    content = {"model": "airnet_xs", "num_classes": 4, "in_channels": 3, "classes": list("abcd"), "state_dict": {}}
    for found, which in ((None, "an older"), (1, "an older"), (checkpoint.FORMAT + 1, "a newer")):
        torch.save(content if found is None else {**content, "format": found}, tmp_path / "c.pt")
        with pytest.raises(checkpoint.OtherFormat) as error:
            checkpoint.load(tmp_path / "c.pt")
        assert str(error.value) == (
            f"written by {which} version of this repo (file format {found or 1}; this version reads "
            f"{checkpoint.FORMAT}); train it again with this version"
        )
    checkpoint.save_progress(tmp_path / "c.last.pt", {"progress": {}})
    assert checkpoint.load_progress(tmp_path / "c.last.pt")["format"] == checkpoint.FORMAT
    torch.save({"progress": {}}, tmp_path / "old.last.pt")
    with pytest.raises(checkpoint.OtherFormat, match=r"file format 1; this version reads"):
        checkpoint.load_progress(tmp_path / "old.last.pt")
