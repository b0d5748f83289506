import copy
import math

import pytest
import torch
import torch.nn.functional as F

import config
import distill
import models
from conftest import tensor_dataset, trained_like

CONFIG = {"ALPHA": 0.75, "TEMPERATURE": 2.0, "LABEL_SMOOTHING": 0.0}


def test_kd_loss_matches_hand_computation():
    student = torch.tensor([[1.0, 2.0, 0.0]])
    teacher = torch.tensor([[0.0, 3.0, 1.0]])
    labels = torch.tensor([1])
    T, alpha = 2.0, 0.75

    def softmax(values):
        exps = [math.exp(v / T) for v in values]
        return [e / sum(exps) for e in exps]

    p_t, p_s = softmax([0.0, 3.0, 1.0]), softmax([1.0, 2.0, 0.0])
    kl = sum(t * math.log(t / s) for t, s in zip(p_t, p_s))
    ce = -math.log(math.exp(2.0) / sum(math.exp(v) for v in [1.0, 2.0, 0.0]))
    expected = (1 - alpha) * ce + alpha * T * T * kl

    method = distill.KD(CONFIG, None, None)
    got = method.loss({"logits": student}, {"logits": teacher}, labels)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert distill.kd_loss(student, teacher, T).item() == pytest.approx(T * T * kl, rel=1e-5)


def test_kd_loss_is_batch_mean_and_zero_for_equal_logits():
    logits = torch.randn(8, 5)
    assert distill.kd_loss(logits, logits.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    a, b = torch.randn(1, 5), torch.randn(1, 5)
    single = distill.kd_loss(a, b, 3.0)
    assert distill.kd_loss(a.repeat(4, 1), b.repeat(4, 1), 3.0).item() == pytest.approx(single.item(), rel=1e-5)


def test_alpha_weights_the_distillation_term():
    student, teacher, labels = torch.randn(4, 6), torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    only_ce = distill.KD({**CONFIG, "ALPHA": 0.0}, None, None).loss({"logits": student}, {"logits": teacher}, labels)
    only_kd = distill.KD({**CONFIG, "ALPHA": 1.0}, None, None).loss({"logits": student}, {"logits": teacher}, labels)
    assert only_ce.item() == pytest.approx(F.cross_entropy(student, labels).item(), rel=1e-6)
    assert only_kd.item() == pytest.approx(distill.kd_loss(student, teacher, 2.0).item(), rel=1e-6)


def test_kd_loss_is_float32_under_bf16_autocast():
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = distill.kd_loss(student.bfloat16(), teacher.bfloat16(), 4.0)
    assert loss.dtype == torch.float32


def tiny(seed=0):
    torch.manual_seed(seed)
    return models.build("airnet_xs", 5, 3)


def test_frozen_teacher_stays_in_eval_and_gets_no_gradient():
    teacher_model = tiny(1)
    before = {k: v.clone() for k, v in teacher_model.state_dict().items()}
    student = tiny(2)
    objective = distill.Distillation(student, teacher_model, distill.KD(CONFIG, student, teacher_model))
    objective.train()
    assert student.training and not objective.teacher.model.training
    assert all(not p.requires_grad for p in objective.teacher.parameters())
    optimizer = torch.optim.SGD([p for p in objective.parameters() if p.requires_grad], lr=0.1)
    images, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    loss, logits = objective(images, labels)
    loss.backward()
    optimizer.step()
    assert logits.shape == (8, 5)
    assert all(p.grad is None for p in objective.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    after = teacher_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "teacher weights or BN statistics changed"


def test_unknown_method_names_the_choices():
    with pytest.raises(KeyError, match="kd"):
        distill.build_method("nope", CONFIG, None, None)


METHOD_CONFIG = {
    **CONFIG,
    "DKD_ALPHA": 1.0,
    "DKD_BETA": 8.0,
    "DKD_WARMUP": 0.0,
    "LSKD_TEMPERATURE": 2.0,
    "LSKD_WEIGHT": 9.0,
    "FITNET_WEIGHT": 100.0,
    "AT_WEIGHT": 1000.0,
}


@pytest.mark.parametrize("seed", range(5))
def test_dkd_parts_decompose_kd_as_the_paper_states(seed):
    torch.manual_seed(seed)
    student, teacher, label = torch.randn(1, 7) * 3, torch.randn(1, 7) * 3, torch.tensor([seed % 7])
    T = 3.0
    tckd, nckd = distill.dkd_parts(student, teacher, label, T)
    p_teacher_target = (teacher / T).softmax(1)[0, label].item()
    assert distill.kd_loss(student, teacher, T).item() == pytest.approx(
        tckd.item() + (1 - p_teacher_target) * nckd.item(), rel=1e-4
    )


def test_dkd_parts_match_a_direct_computation():
    student, teacher, labels = torch.tensor([[2.0, 0.5, -1.0]]), torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([0])
    T = 2.0
    ps, pt = (student / T).softmax(1)[0], (teacher / T).softmax(1)[0]
    tckd = sum(b * math.log(b / a) for a, b in ((ps[0], pt[0]), (1 - ps[0], 1 - pt[0]))) * T * T
    rest_s, rest_t = ps[1:] / ps[1:].sum(), pt[1:] / pt[1:].sum()
    nckd = sum(t * math.log(t / s) for s, t in zip(rest_s.tolist(), rest_t.tolist())) * T * T
    got_t, got_n = distill.dkd_parts(student, teacher, labels, T)
    assert got_t.item() == pytest.approx(float(tckd), rel=1e-5)
    assert got_n.item() == pytest.approx(float(nckd), rel=1e-5)


def test_dkd_ramps_its_distillation_term_up_epoch_by_epoch():
    # 20 epochs with DKD_WARMUP 0.1 ramp over 2 epochs: half weight in epoch 1, full from epoch 2
    method = distill.DKD({**METHOD_CONFIG, "DKD_WARMUP": 0.1}, None, None)
    student, teacher, labels = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    ce = F.cross_entropy(student, labels)
    tckd, nckd = distill.dkd_parts(student, teacher, labels, 2.0)
    for epoch, ramp in [(1, 0.5), (2, 1.0), (20, 1.0)]:
        method.set_progress(epoch / 20)  # as the training loop sets it
        expected = ce + ramp * (tckd + 8.0 * nckd)
        assert method.loss({"logits": student}, {"logits": teacher}, labels).item() == pytest.approx(
            expected.item(), rel=1e-5
        )


def test_lskd_is_kd_on_z_scored_logits_and_ignores_logit_scale():
    method = distill.LSKD(METHOD_CONFIG, None, None)
    student, teacher, labels = torch.randn(3, 6), torch.randn(3, 6), torch.tensor([0, 1, 2])

    def z(x):
        return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)

    expected = 0.25 * F.cross_entropy(student, labels) + 9.0 * distill.kd_loss(z(student), z(teacher), 2.0)
    assert method.loss({"logits": student}, {"logits": teacher}, labels).item() == pytest.approx(
        expected.item(), rel=1e-5
    )
    soft = method.soft_targets_loss(student, teacher)
    assert method.soft_targets_loss(student, teacher * 10 + 3).item() == pytest.approx(soft.item(), rel=1e-4)


def test_attention_transfer_matches_a_direct_computation():
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8, 8)
    a_s = s.pow(2).mean(1).flatten(1)
    a_t = t.pow(2).mean(1).flatten(1)
    expected = (a_s / a_s.norm(dim=1, keepdim=True) - a_t / a_t.norm(dim=1, keepdim=True)).pow(2).mean()
    got = (distill.attention_map(s, (8, 8)) - distill.attention_map(t, (8, 8))).pow(2).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("method", ["fitnet", "at", "kd", "dkd", "lskd"])
@pytest.mark.parametrize(
    "student_name,teacher_name", [("airnet_xs", "airnet_s"), ("resnet8", "vgg8"), ("mobilenetv2", "resnet14")]
)
def test_methods_give_finite_loss_and_gradients_across_architectures(method, student_name, teacher_name):
    torch.manual_seed(0)
    student, teacher = models.build(student_name, 10, 3), models.build(teacher_name, 10, 3)
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    objective = distill.Distillation(
        student, teacher, distill.build_method(method, METHOD_CONFIG, student, teacher, images[:2])
    )
    objective.train()
    loss, logits = objective(images, labels)
    assert torch.isfinite(loss) and logits.shape == (4, 10)
    loss.backward()
    trained = [p for p in student.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    adapters = list(objective.method.parameters())
    assert bool(adapters) == (method == "fitnet")  # only FitNet has a trainable adapter
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters)
    assert all(p.grad is None for p in objective.teacher.parameters())


def test_fitnet_loss_matches_a_direct_computation():
    torch.manual_seed(0)
    student, teacher = models.build("airnet_xs", 10, 3), models.build("airnet_s", 10, 3)
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    method = distill.build_method("fitnet", METHOD_CONFIG, student, teacher, images[:2])
    method.train()
    s_out, t_out = student.forward_features(images), teacher.forward_features(images)
    hint, target = s_out["stages"][1], t_out["stages"][1]  # the middle of three stages
    conv, norm = method.adapter[0], method.adapter[1]
    projected = torch.einsum("oc,nchw->nohw", conv.weight[:, :, 0, 0], hint)
    mean = projected.mean(dim=(0, 2, 3), keepdim=True)
    var = projected.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    normalised = (projected - mean) / torch.sqrt(var + norm.eps) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(
        1, -1, 1, 1
    )
    expected = F.cross_entropy(s_out["logits"], labels) + 100.0 * ((normalised - target) ** 2).mean()
    got = method.loss(s_out, t_out, labels)
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)


def test_a_routed_teacher_teaches_each_leg_with_the_next_weights_then_its_final_ones():
    final, early, middle = tiny(0), tiny(1), tiny(2)
    heads = [m.state_dict()["head.0.weight"].clone() for m in (early, middle, final)]
    frozen = distill.FrozenTeacher(final, route=[early.state_dict(), middle.state_dict()])
    legs = []
    for epoch in range(1, 7):  # 6 epochs, 3 legs of 2 epochs: early, middle, final
        frozen.set_progress(epoch / 6)
        legs.append([torch.equal(frozen.model.state_dict()["head.0.weight"], h) for h in heads].index(True))
    assert legs == [0, 0, 1, 1, 2, 2]
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(frozen(images)["logits"], tiny(0).eval()(images))
    assert distill.FrozenTeacher(tiny(0)).route == []  # no route: nothing kept, nothing loaded


def test_the_frozen_teacher_runs_folded_with_the_outputs_of_the_teacher_on_every_leg():
    final, early = trained_like(tiny(0), 0), trained_like(tiny(1), 1)
    frozen = distill.FrozenTeacher(copy.deepcopy(final), route=[early.state_dict()])
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.model.modules())
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for progress, teacher in [(0.5, early), (1.0, final)]:
        frozen.set_progress(progress)
        got, want = frozen(images), teacher.forward_features(images)
        for a, b in zip([*got["stages"], got["logits"]], [*want["stages"], want["logits"]]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(got["logits"], (early if teacher is final else final)(images), atol=1e-3)


def test_a_mirrored_teacher_averages_the_logits_of_each_image_and_its_mirror():
    model, images = tiny(0).eval(), torch.randn(3, 3, 16, 16)
    out = distill.FrozenTeacher(model, mirror=True)(images)
    with torch.no_grad():
        expected = (model(images) + model(images.flip(3))) / 2
        plain = model.forward_features(images)
    assert torch.allclose(out["logits"], expected, atol=1e-6)
    assert torch.equal(out["pooled"], plain["pooled"]) and len(out["stages"]) == len(plain["stages"])


def test_a_student_from_the_teacher_on_a_route_starts_where_the_route_starts():
    cfg = config.parse(["--teacher", "airnet_s", "--student-init", "teacher", "--route", "--device", "cpu"])
    dataset = tensor_dataset(torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8), torch.arange(16) % 5, 5)
    teacher, early = models.build("airnet_s", 5), models.build("airnet_s", 5)
    objective = distill.build_objective(cfg, "airnet_xs", dataset, torch.device("cpu"), teacher, [early.state_dict()])
    expected = models.select_weights(objective.model.state_dict(), early.state_dict())
    assert all(torch.equal(v, expected[k]) for k, v in objective.model.state_dict().items())
    plain = distill.build_objective({**cfg, "ROUTE": False}, "airnet_xs", dataset, torch.device("cpu"), teacher)
    expected = models.select_weights(plain.model.state_dict(), teacher.state_dict())
    assert all(torch.equal(v, expected[k]) for k, v in plain.model.state_dict().items())


def test_a_leg_whose_weights_fold_other_layers_gets_its_own_folded_network():
    final, early = trained_like(tiny(0), 0), trained_like(tiny(1), 1)
    early.stages[0][0][2].weight.data[0] = -1.0  # a negative scale after the max-pool: that norm cannot fold
    frozen = distill.FrozenTeacher(copy.deepcopy(final), route=[early.state_dict()])
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    frozen.set_progress(0.5)
    assert isinstance(frozen.model.stages[0][0][2], torch.nn.BatchNorm2d)
    torch.testing.assert_close(frozen(images)["logits"], early(images), rtol=1e-4, atol=1e-4)
    frozen.set_progress(1.0)
    torch.testing.assert_close(frozen(images)["logits"], final(images), rtol=1e-4, atol=1e-4)
