"""The optimiser, its schedules and the lookahead."""

import pytest
import torch

import distill
import models
import optim


def test_lookahead_pulls_weights_to_their_average_and_ends_on_it():
    model = torch.nn.Linear(1, 1, bias=False)
    model.weight.data.fill_(1.0)
    lookahead = optim.Lookahead(model, total_steps=40, batch_size=2560)  # every 5120 / 2560 = 2 steps
    model.weight.data.fill_(3.0)
    lookahead.step(1)  # not a multiple of `every`: nothing happens
    assert model.weight.item() == 3.0
    lookahead.step(2)  # decay 0.95^5 * (2/40)^3: average = 1 + (3 - 1) * (1 - decay)
    expected = 1 + 2 * (1 - 0.95**5 / 20**3)
    assert model.weight.item() == pytest.approx(expected) and lookahead.state_dict()["weight"].item() == pytest.approx(
        expected
    )
    model.weight.data.fill_(10.0)
    lookahead.step(39)  # nor here
    assert model.weight.item() == 10.0
    lookahead.step(40)  # the last step, though not a multiple of `every`: decay 0.95^5
    expected += (10 - expected) * (1 - 0.95**5)
    assert model.weight.item() == pytest.approx(expected)


def test_lookahead_pulls_at_least_twenty_times_in_a_short_run():
    model = torch.nn.Linear(1, 1, bias=False)
    assert optim.Lookahead(model, total_steps=100, batch_size=256).every == 5
    assert optim.Lookahead(model, total_steps=7, batch_size=256).every == 1
    assert optim.Lookahead(model, total_steps=2000, batch_size=256).every == 20


def test_only_shifts_of_fixed_scale_norms_get_the_bias_learning_rate():
    cfg = {"WEIGHT_DECAY": 0.01, "BIAS_LR_SCALE": 64.0, "OPTIMIZER": "sgd", "MOMENTUM": 0.9}
    airnet, resnet = models.build("airnet_xs", 10, 3), models.build("resnet8", 10, 3)
    rates = {}
    for name, model in (("airnet", airnet), ("resnet", resnet)):
        optimizer = optim.make_optimizer(distill.Supervised(model, 0.0), cfg, 0.1)
        rates[name] = {
            id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]
        }
        assert len(rates[name]) == sum(p.requires_grad for p in model.parameters())
    norm = airnet.stages[0][0][2]
    assert not norm.weight.requires_grad and id(norm.weight) not in rates["airnet"]
    assert rates["airnet"][id(norm.bias)] == (6.4, 0.0)
    assert rates["airnet"][id(airnet.head[0].bias)] == (0.1, 0.0)
    assert rates["airnet"][id(airnet.head[0].weight)] == (0.1, 0.01)
    assert {lr for lr, _ in rates["resnet"].values()} == {0.1}  # its norms learn a scale too: no faster rate


def test_step_schedule_drops_tenfold_at_each_milestone():
    multiplier = optim.lr_multiplier(100, 0.0, "step", (0.5, 0.75))
    assert [multiplier(s) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    linear = optim.lr_multiplier(100, 0.1, "linear")
    assert linear(0) == pytest.approx(0.1) and linear(9) == pytest.approx(1.0) and linear(99) == pytest.approx(1 / 90)
