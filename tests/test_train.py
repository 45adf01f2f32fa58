"""The shared training loop: learning-rate schedule, EMA, and exact resumption after an interruption."""
import math
from dataclasses import replace

import pytest
import torch

from minisd.train.loop import EMA, TrainConfig, train
from minisd.train.lr import learning_rate


def test_tiny_schedule_warms_up_then_follows_cosine_cycles():
    cfg = TrainConfig(steps=1100, lr=1.0, lr_schedule="tiny", warmup_steps=100, cycles=2)
    assert learning_rate(0, cfg) == pytest.approx(0.01)
    assert learning_rate(99, cfg) == pytest.approx(1.0)
    assert learning_rate(100, cfg) == pytest.approx(1.0)              # top of cycle 1
    assert learning_rate(350, cfg) == pytest.approx(0.5)              # a quarter through: cos(pi/2) half-way down
    assert learning_rate(599, cfg) < 1e-4                             # bottom of cycle 1 ...
    assert learning_rate(600, cfg) == pytest.approx(1.0)              # ... restarts at the top
    one = TrainConfig(steps=1100, lr=1.0, lr_schedule="tiny", warmup_steps=100, cycles=1)
    assert learning_rate(600, one) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_ema_follows_the_lerp_rule_with_warmup():
    p = {"w": torch.zeros(3)}
    ema = EMA(p, decay=0.9)
    p["w"] = torch.ones(3)
    ema.update(p)                       # d = min(0.9, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.shadow["w"], torch.full((3,), 1 - d))


def _toy_problem(seed=0):
    torch.manual_seed(1000)
    target = torch.nn.Linear(4, 1)                          # the problem is fixed ...
    torch.manual_seed(seed)                                 # ... the starting weights depend on `seed`
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def loss_fn(step, generator):
        x = torch.randn(16, 4, generator=generator)        # batch i is a pure function of (seed, i)
        return ((net(x) - target(x).detach()) ** 2).mean()
    return net, loss_fn


def test_interrupted_training_resumes_exactly(tmp_path):
    cfg = TrainConfig(steps=40, lr=1e-2, lr_schedule="tiny", warmup_steps=5, checkpoint_every=10)
    net, loss_fn = _toy_problem()
    straight = train(net, dict(net.named_parameters()), loss_fn, cfg, tmp_path / "a", "toy", log=lambda *_: None)

    net, loss_fn = _toy_problem()

    class Interrupt(Exception):
        pass

    def stop_at_25(step, loss, lr):
        if step == 25:
            raise Interrupt
    with pytest.raises(Interrupt):
        train(net, dict(net.named_parameters()), loss_fn, cfg, tmp_path / "b", "toy", on_step=stop_at_25,
              log=lambda *_: None)
    net, loss_fn = _toy_problem(seed=123)      # a fresh process would start from other random weights
    resumed = train(net, dict(net.named_parameters()), loss_fn, cfg, tmp_path / "b", "toy", log=lambda *_: None)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    # and the training did something (the comparison could fail)
    net0, _ = _toy_problem()
    assert not torch.equal(straight["0.weight"], net0[0].weight)


def test_training_until_a_step_leaves_the_run_there_on_its_own_schedule(tmp_path):
    # `until` stops a run part-way through its schedule with a checkpoint (a recipe's early checkpoints, as
    # bench/tiny_fid_curve.py evaluates them); resuming with a later `until` continues exactly
    cfg = TrainConfig(steps=40, lr=1e-2, lr_schedule="tiny", warmup_steps=5, checkpoint_every=100, ema_decay=0)
    net, loss_fn = _toy_problem()
    rates = []
    straight = train(net, dict(net.named_parameters()), loss_fn, cfg, tmp_path / "a", "toy", log=lambda *_: None,
                     on_step=lambda step, loss, lr: rates.append(lr))
    net, loss_fn = _toy_problem()
    part_rates = []
    record = lambda step, loss, lr: part_rates.append(lr)
    for until in (7, 30, None):
        part = train(net, dict(net.named_parameters()), loss_fn, replace(cfg, until=until), tmp_path / "b", "toy",
                     log=lambda *_: None, on_step=record)
        if until == 7:
            assert len(part_rates) == 7 and not torch.equal(part["0.weight"], straight["0.weight"])
    assert part_rates == rates                  # the 40-step schedule throughout, not a 7-step one
    for k in straight:
        assert torch.equal(straight[k], part[k]), k


def test_parameter_groups_train_at_their_own_rate(tmp_path):
    """lr_scales: the first layer at rate 0 does not move at all (AdamW's decay is scaled by the rate too), the
    rest trains at lr."""
    cfg = TrainConfig(steps=3, lr=1e-2, optimizer="adamw", lr_scales=(("0.", 0.0),), ema_decay=0,
                      checkpoint_every=10)
    net, loss_fn = _toy_problem()
    before = {k: p.detach().clone() for k, p in net.named_parameters()}
    after = train(net, dict(net.named_parameters()), loss_fn, cfg, tmp_path, "toy", log=lambda *_: None)
    assert torch.equal(after["0.weight"], before["0.weight"]) and torch.equal(after["0.bias"], before["0.bias"])
    assert not torch.equal(after["2.weight"], before["2.weight"])

