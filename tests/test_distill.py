import math

import pytest
import torch
import torch.nn.functional as F

import distill
import models

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
