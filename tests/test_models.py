import pytest
import torch

import config
import models


@pytest.mark.parametrize("name", sorted(models.MODELS))
@pytest.mark.parametrize("channels,size", [(3, 32), (1, 28), (3, 40)])
def test_forward_shapes_and_features(name, channels, size):
    model = models.build(name, 7, channels, dropout=0.2).eval()
    x = torch.randn(2, channels, size, size)
    out = model.forward_features(x)
    assert out["logits"].shape == (2, 7)
    assert torch.equal(model(x), out["logits"])
    assert out["pooled"].shape[0] == 2 and out["pooled"].ndim == 2
    assert len(out["stages"]) >= 3 and all(f.shape[0] == 2 and f.ndim == 4 for f in out["stages"])


def test_default_student_is_at_most_a_tenth_of_the_teacher():
    teacher = models.count_params(models.build(config.TEACHER, 10, 3))
    student = models.count_params(models.build(config.STUDENT, 10, 3))
    assert student * 10 <= teacher


@pytest.mark.parametrize("name", [config.TEACHER, config.STUDENT])
def test_default_models_apply_dropout_in_training_only(name):
    x = torch.randn(8, 3, 32, 32)
    model = models.build(name, 10, 3, dropout=0.5).train()
    assert not torch.equal(model(x), model(x))  # a new mask on each call
    model.eval()
    assert torch.equal(model(x), model(x))
    plain = models.build(name, 10, 3, dropout=0.0).train()
    assert torch.equal(plain(x), plain(x))  # so the difference above came from dropout alone


def test_unknown_model_names_the_choices():
    with pytest.raises(KeyError, match="airnet_xs"):
        models.build("resnet9000", 10)


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = models.build("airnet_xs", 4, 3).eval()
    model(torch.randn(8, 3, 32, 32))  # nothing changes in eval mode, but exercise it
    checkpoint = {"model": "airnet_xs", "num_classes": 4, "in_channels": 3, "classes": list("abcd"),
                  "state_dict": model.state_dict()}
    torch.save(checkpoint, tmp_path / "c.pt")
    loaded = models.checkpoint_model(models.load_checkpoint(tmp_path / "c.pt")).eval()
    x = torch.randn(5, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))


def test_checkpoint_of_wrong_shape_is_a_readable_error(tmp_path):
    state = models.build("airnet_xs", 4, 3).state_dict()
    checkpoint = {"model": "airnet_xs", "num_classes": 10, "in_channels": 3, "classes": list("abcd"), "state_dict": state}
    with pytest.raises(ValueError, match="do not fit"):
        models.checkpoint_model(checkpoint)


def test_load_checkpoint_refuses_other_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"not a checkpoint written by train.py \(not a torch file\)"):
        models.load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a checkpoint of this repo"):
        models.load_checkpoint(tmp_path / "other.pt")


@pytest.mark.parametrize("name,published", [("resnet8x4", 1.23e6), ("resnet32x4", 7.43e6), ("wrn_40_2", 2.25e6),
                                            ("wrn_16_2", 0.70e6), ("resnet56", 0.86e6), ("resnet20", 0.28e6),
                                            ("vgg13", 9.46e6), ("vgg8", 3.96e6), ("mobilenetv2", 0.81e6),
                                            ("shufflenetv1", 0.95e6), ("shufflenetv2", 1.36e6)])
def test_zoo_parameter_counts_match_the_published_ones(name, published):
    """Counts for CIFAR-100 (100 classes), as tabulated by RepDistiller and mdistiller."""
    assert models.count_params(models.build(name, 100, 3)) == pytest.approx(published, rel=0.01)
