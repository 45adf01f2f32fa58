"""Learning-rate schedules equal diffusers' and transformers' get_scheduler at every optimizer step.

The reference side drives the library's LambdaLR on a dummy optimizer and reads the rate the optimizer holds before
each step, i.e. the rate a training step would use. Tolerance: 1e-12 relative. Both sides evaluate the same float64
formula; where ours is rearranged (polynomial's end rate, the floor) the difference is a few ulps (~1e-16), so
1e-12 leaves four orders of margin while any formula difference (an off-by-one step moves a rate by >= 1e-4 of
itself here) fails by far. A reference rate of exactly 0 must be matched exactly.
"""
import math

import pytest
import torch
from diffusers import optimization as dopt
from transformers import optimization as topt

from minisd.train.loop import TrainConfig
from minisd.train.lr import learning_rate

LR = 1e-4
RTOL = 1e-12


def reference_rates(make_scheduler, steps):
    """The rate the optimizer holds before each of steps + 5 optimizer steps (past the end too)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    scheduler = make_scheduler(opt)
    rates = []
    for _ in range(steps + 5):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()                  # no gradient: a no-op, but keeps the step order the schedulers expect
        scheduler.step()
    return rates


def our_rates(steps, **schedule):
    cfg = TrainConfig(steps=steps, lr=LR, **schedule)
    return [learning_rate(k, cfg) for k in range(steps + 5)]


def max_relative_error(ours, ref):
    return max(abs(a - b) / abs(b) if b else (0.0 if a == 0 else math.inf) for a, b in zip(ours, ref))


def assert_same(ours, ref):
    assert len(ours) == len(ref)
    assert max_relative_error(ours, ref) <= RTOL


STEPS = [100, 97]                   # 97: cycles do not divide the decay into whole steps
WARMUPS = [0, 10]


@pytest.mark.parametrize("steps", STEPS)
def test_constant_equals_diffusers_and_transformers(steps):
    ours = our_rates(steps, lr_schedule="constant")
    assert_same(ours, reference_rates(lambda o: dopt.get_scheduler("constant", o), steps))
    assert_same(ours, reference_rates(lambda o: topt.get_scheduler("constant", o), steps))


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("warmup", WARMUPS)
def test_constant_with_warmup_equals_diffusers_and_transformers(steps, warmup):
    ours = our_rates(steps, lr_schedule="constant_with_warmup", warmup_steps=warmup)
    kw = dict(num_warmup_steps=warmup)
    assert_same(ours, reference_rates(lambda o: dopt.get_scheduler("constant_with_warmup", o, **kw), steps))
    assert_same(ours, reference_rates(lambda o: topt.get_scheduler("constant_with_warmup", o, **kw), steps))


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("warmup", WARMUPS)
def test_linear_equals_diffusers_and_transformers(steps, warmup):
    ours = our_rates(steps, lr_schedule="linear", warmup_steps=warmup)
    kw = dict(num_warmup_steps=warmup, num_training_steps=steps)
    assert_same(ours, reference_rates(lambda o: dopt.get_scheduler("linear", o, **kw), steps))
    assert_same(ours, reference_rates(lambda o: topt.get_scheduler("linear", o, **kw), steps))


@pytest.mark.parametrize("warmup", WARMUPS)
def test_linear_floor_is_diffusers_f_min(warmup):
    ours = our_rates(100, lr_schedule="linear", warmup_steps=warmup, min_lr_ratio=0.1)
    assert_same(ours, reference_rates(lambda o: dopt.get_linear_schedule_with_warmup(o, warmup, 100, f_min=0.1), 100))


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("warmup", WARMUPS)
@pytest.mark.parametrize("cycles", [None, 0.5, 1, 3, 5, 2.5])
def test_cosine_equals_diffusers_and_transformers(steps, warmup, cycles):
    ours = our_rates(steps, lr_schedule="cosine", warmup_steps=warmup, cycles=cycles)
    c = 0.5 if cycles is None else cycles
    kw = dict(num_warmup_steps=warmup, num_training_steps=steps)
    # diffusers' get_scheduler never passes num_cycles to cosine, so its cycles are reached through the function
    assert_same(ours, reference_rates(lambda o: dopt.get_cosine_schedule_with_warmup(o, num_cycles=c, **kw), steps))
    assert_same(ours, reference_rates(
        lambda o: topt.get_scheduler("cosine", o, scheduler_specific_kwargs={"num_cycles": c}, **kw), steps))
    if cycles is None:
        assert_same(ours, reference_rates(lambda o: dopt.get_scheduler("cosine", o, **kw), steps))


@pytest.mark.parametrize("warmup", WARMUPS)
@pytest.mark.parametrize("cycles", [0.5, 3])
def test_cosine_floor_is_transformers_cosine_with_min_lr(warmup, cycles):
    ours = our_rates(100, lr_schedule="cosine", warmup_steps=warmup, cycles=cycles, min_lr_ratio=0.1)
    kw = dict(num_warmup_steps=warmup, num_training_steps=100,
              scheduler_specific_kwargs={"num_cycles": cycles, "min_lr_rate": 0.1})
    assert_same(ours, reference_rates(lambda o: topt.get_scheduler("cosine_with_min_lr", o, **kw), 100))


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("warmup", WARMUPS)
@pytest.mark.parametrize("cycles", [None, 1, 3, 5])
def test_cosine_with_restarts_equals_diffusers_and_transformers(steps, warmup, cycles):
    ours = our_rates(steps, lr_schedule="cosine_with_restarts", warmup_steps=warmup, cycles=cycles)
    c = 1 if cycles is None else cycles
    kw = dict(num_warmup_steps=warmup, num_training_steps=steps)
    ref = reference_rates(lambda o: dopt.get_scheduler("cosine_with_restarts", o, num_cycles=c, **kw), steps)
    assert_same(ours, ref)
    assert_same(ours, reference_rates(
        lambda o: topt.get_scheduler("cosine_with_restarts", o, scheduler_specific_kwargs={"num_cycles": c}, **kw),
        steps))


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("warmup", WARMUPS)
@pytest.mark.parametrize("power", [1.0, 2.0, 0.5])
def test_polynomial_equals_diffusers_and_transformers(steps, warmup, power):
    ours = our_rates(steps, lr_schedule="polynomial", warmup_steps=warmup, lr_power=power)
    kw = dict(num_warmup_steps=warmup, num_training_steps=steps)
    assert_same(ours, reference_rates(lambda o: dopt.get_scheduler("polynomial", o, power=power, **kw), steps))
    assert_same(ours, reference_rates(
        lambda o: topt.get_scheduler("polynomial", o, scheduler_specific_kwargs={"power": power}, **kw), steps))


def test_polynomial_floor_is_its_end_rate():
    ours = our_rates(100, lr_schedule="polynomial", warmup_steps=10, lr_power=2.0, min_lr_ratio=0.1)
    ref = reference_rates(lambda o: dopt.get_polynomial_decay_schedule_with_warmup(o, 10, 100, lr_end=0.1 * LR,
                                                                                   power=2.0), 100)
    assert_same(ours, ref)


def test_restarts_floor_matches_the_tiny_schedule_after_warmup():
    # no library has restarts with a floor; the tiny schedule (written before this module) does
    ours = our_rates(100, lr_schedule="cosine_with_restarts", warmup_steps=10, cycles=3, min_lr_ratio=0.2)
    tiny = our_rates(100, lr_schedule="tiny", warmup_steps=10, cycles=3, min_lr_ratio=0.2)
    assert ours[10:100] == tiny[10:100]
    assert min(ours) == 0.0 and min(ours[10:]) == pytest.approx(0.2 * LR)


def test_the_comparison_catches_an_off_by_one_warmup():
    # the tiny schedule's warmup is lr (k + 1) / W: one step ahead of diffusers' lr k / W, and nothing else differs
    kw = dict(num_warmup_steps=10, num_training_steps=100)
    ref = reference_rates(lambda o: dopt.get_scheduler("cosine_with_restarts", o, num_cycles=3, **kw), 100)
    tiny = our_rates(100, lr_schedule="tiny", warmup_steps=10, cycles=3)
    assert max_relative_error(tiny[:100], ref[:100]) > 1e6 * RTOL      # step 0: lr / 10 against 0
    assert max_relative_error(tiny[1:10], ref[1:10]) >= 0.1           # 1/W at step W - 1 at the least
    assert_same(tiny[10:100], ref[10:100])


def _shipped_learning_rate(step, lr, steps, warmup_steps, cycles, min_lr_ratio):
    """minisd/train/lr.py as it was when the tiny model was trained (frozen copy)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    cycle_progress = (progress * cycles) % 1.0
    cosine = 0.5 * (1 + math.cos(math.pi * cycle_progress))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * cosine)


@pytest.mark.parametrize("lr, steps, warmup", [(2e-3, 800, 50), (1e-3, 1000, 50), (1e-3, 10000, 100)])
@pytest.mark.parametrize("cycles, min_ratio", [(1, 0.0), (3, 0.1)])
def test_tiny_schedule_reproduces_the_shipped_rates_bit_for_bit(lr, steps, warmup, cycles, min_ratio):
    cfg = TrainConfig(steps=steps, lr=lr, lr_schedule="tiny", warmup_steps=warmup, cycles=cycles,
                      min_lr_ratio=min_ratio)
    for k in range(steps):
        assert learning_rate(k, cfg) == _shipped_learning_rate(k, lr, steps, warmup, cycles, min_ratio), k


@pytest.mark.parametrize("schedule, message", [
    (dict(lr_schedule="cosine_annealing"), "unknown learning-rate schedule 'cosine_annealing'"),
    (dict(lr_schedule="linear", steps=-1), "steps must be >= 0, got -1"),
    (dict(lr_schedule="linear", warmup_steps=-5), "warmup_steps must be >= 0, got -5"),
    (dict(lr_schedule="cosine_with_restarts", cycles=0), "cycles must be a whole number >= 1"),
    (dict(lr_schedule="cosine_with_restarts", cycles=2.5), "cycles must be a whole number >= 1"),
    (dict(lr_schedule="tiny", cycles=0), "cycles must be a whole number >= 1"),
    (dict(lr_schedule="cosine", cycles=0), "cycles must be > 0 for cosine"),
    (dict(lr_schedule="linear", cycles=3), "the linear schedule does not use cycles"),
    (dict(lr_schedule="polynomial", cycles=3), "the polynomial schedule does not use cycles"),
    (dict(lr_schedule="constant", warmup_steps=500), "the constant schedule does not use warmup_steps"),
    (dict(lr_schedule="cosine", lr_power=2.0), "the cosine schedule does not use lr_power"),
    (dict(lr_schedule="cosine", min_lr_ratio=1.0), "min_lr_ratio must be in [0, 1), got 1.0"),
    (dict(lr_schedule="polynomial", lr=1e-8), "polynomial decays to 1e-07, which must be below lr (1e-08)"),
])
def test_bad_schedules_raise_one_line_errors_naming_the_problem(schedule, message):
    cfg = TrainConfig(**{"steps": 100, **schedule})
    with pytest.raises(ValueError) as e:
        learning_rate(0, cfg)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_negative_step_is_an_error():
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        learning_rate(-1, TrainConfig(steps=10))
