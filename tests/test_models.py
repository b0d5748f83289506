import pytest
import torch

import config
import models
from conftest import trained_like


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


def randomised(model, seed):
    """`model` with every parameter and batch-norm statistic random, so that a copy of the wrong entry shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point() and tensor.dim() > 0:
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
    return model.eval()


@pytest.mark.parametrize("name", ["airnet_m", "resnet8x4", "wrn_16_2"])
def test_a_student_of_the_teachers_shape_starts_with_the_teachers_outputs(name):
    teacher, student = randomised(models.build(name, 10), 0), randomised(models.build(name, 10), 1)
    student.load_state_dict(models.select_weights(student.state_dict(), teacher.state_dict()))
    images = torch.randn(4, 3, 32, 32)
    assert torch.equal(student(images), teacher(images))


def test_weight_selection_takes_evenly_spaced_channels_and_the_first_blocks():
    assert models.evenly_spaced(16, 32).tolist() == list(range(0, 32, 2))
    assert models.evenly_spaced(40, 128).tolist()[:6] == [0, 3, 6, 9, 12, 16]
    teacher, student = randomised(models.build("airnet_m", 10), 0), models.build("airnet_xs", 10)
    state = models.select_weights(student.state_dict(), teacher.state_dict())
    conv = teacher.state_dict()["stages.1.0.0.weight"]  # 128 x 32 x 3 x 3; the student's is 32 x 16 x 3 x 3
    assert torch.equal(state["stages.1.0.0.weight"], conv[0::4][:, 0::2])
    head = teacher.state_dict()["head.0.weight"]  # 10 x 128; the student's is 10 x 40
    assert torch.equal(state["head.0.weight"], head[:, models.evenly_spaced(40, 128)])
    deep, shallow = randomised(models.build("wrn_40_2", 10), 0), models.build("wrn_16_2", 10)
    state = models.select_weights(shallow.state_dict(), deep.state_dict())
    assert torch.equal(state["stages.1.1.conv2.weight"], deep.state_dict()["stages.1.1.conv2.weight"])


@pytest.mark.parametrize(
    "student, teacher, problem",
    [
        ("airnet_xs", "resnet32x4", "the teacher has no tensor"),
        ("airnet_m", "airnet_xs", "larger than the teacher's"),
        ("resnet32x4", "resnet8x4", "the teacher has no tensor stages.0.1"),
    ],
)
def test_weight_selection_refuses_a_pair_it_cannot_map(student, teacher, problem):
    with pytest.raises(ValueError, match=problem):
        models.select_weights(models.build(student, 10).state_dict(), models.build(teacher, 10).state_dict())


def norms(model):
    return sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name,kept", [("airnet_m", 0), ("resnet8x4", 0), ("wrn_16_2", 7)])
def test_folded_batch_norm_gives_the_same_features(name, kept):
    model = trained_like(models.build(name, 10, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = models.fold_batch_norm(model)
    assert norms(folded) == kept  # wrn_16_2 keeps its 6 pre-activation norms and the final one
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model.forward_features(x), folded.forward_features(x)
    for a, b in zip([*want["stages"], want["pooled"], want["logits"]], [*got["stages"], got["pooled"], got["logits"]]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the original is untouched


def test_a_norm_after_a_max_pool_with_a_negative_scale_stays():
    model = trained_like(models.build("airnet_m", 10, 3))
    norm = model.stages[0][0][2]
    norm.weight.data[3] = -1.0  # max-pool then a negative scale is not a convolution then max-pool
    folded = models.fold_batch_norm(model)
    assert norms(folded) == 1 and isinstance(folded.stages[0][0][2], torch.nn.BatchNorm2d)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_gelu_is_torchs_gelu_in_either_layout_forward_and_backward(memory_format, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 6, 5, 5, generator=generator) * 3).contiguous(memory_format=memory_format).requires_grad_()
    expected = torch.nn.functional.gelu(x)
    seen = []  # what torch's gelu is handed: a channels_last map goes as its (N, H, W, C) view, a default one as is
    torch_gelu = torch.nn.functional.gelu
    monkeypatch.setattr(
        torch.nn.functional, "gelu", lambda t: seen.append((tuple(t.shape), t.is_contiguous())) or torch_gelu(t)
    )
    y = models.gelu(x)
    assert seen == [((4, 5, 5, 6) if memory_format == torch.channels_last else (4, 6, 5, 5), True)]
    assert y.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    weights = torch.randn(4, 6, 5, 5, generator=generator)
    (got,) = torch.autograd.grad((y * weights).sum(), x)
    (want,) = torch.autograd.grad((expected * weights).sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
