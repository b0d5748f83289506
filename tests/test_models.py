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


def test_global_max_pool_is_the_adaptive_max_pool():
    x = torch.randn(3, 5, 7, 6)
    assert torch.equal(models.GlobalMaxPool()(x), torch.nn.AdaptiveMaxPool2d(1)(x))


def test_unknown_model_names_the_choices():
    with pytest.raises(KeyError, match="airnet_xs"):
        models.build("resnet9000", 10)


@pytest.mark.parametrize(
    "name,published",
    [
        ("resnet8x4", 1.23e6),
        ("resnet32x4", 7.43e6),
        ("wrn_40_2", 2.25e6),
        ("wrn_16_2", 0.70e6),
        ("resnet56", 0.86e6),
        ("resnet20", 0.28e6),
        ("vgg13", 9.46e6),
        ("vgg8", 3.96e6),
        ("mobilenetv2", 0.81e6),
        ("shufflenetv1", 0.95e6),
        ("shufflenetv2", 1.36e6),
    ],
)
def test_zoo_parameter_counts_match_the_published_ones(name, published):
    """Counts for CIFAR-100 (100 classes), as tabulated by RepDistiller and mdistiller."""
    assert models.count_params(models.build(name, 100, 3)) == pytest.approx(published, rel=0.01)


def test_whitening_of_grey_images_stored_as_rgb_is_the_same_in_bf16_and_float32():
    """Grey images with three equal channels leave 8 of the 12 patch directions
    without variance. Their filters must be zero: scaled by 1/sqrt(eps), they
    turned bf16's rounding into features that float32 evaluation lacks (a
    real digit dataset lost its validation accuracy to them)."""
    grey = torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 4 - 2
    images = grey.expand(-1, 3, -1, -1).contiguous()
    model = models.build("airnet_xs", 10, 3)
    model.init_from_data(images)
    with torch.no_grad():
        full = model.whiten(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = model.whiten(images).float()
    silent = full.abs().amax(dim=(0, 2, 3)) == 0  # the directions the data lacks
    assert int(silent.sum()) == 16  # 8 directions, both signs
    assert torch.equal(rounded[:, silent], torch.zeros_like(rounded[:, silent]))
    assert (rounded - full).abs().max() < 0.05  # the other channels differ by rounding alone
