"""Retraining learning-rate schedules (FT, LRW, SLR, CLR, ALLR): each against its formula,
written out here step by step, as torch LRSchedulers (state_dict resume, param groups),
their argument checks, and use with LotteryTicket's scheduler_fn."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparsekernels.methods.schedules import ALLR, CLR, FT, LRW, SLR, allr_initial_lr, lr_trace


def _opt(lr=1.0, groups=1):
    params = [{"params": [nn.Parameter(torch.zeros(2))]} for _ in range(groups)]
    return torch.optim.SGD(params, lr=lr)


def _run(make, steps):
    """The rate each of ``steps`` optimizer steps used under the scheduler ``make(opt)``."""
    opt = _opt()
    sched = make(opt)
    seen = []
    for _ in range(steps):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return seen, opt, sched


def _warmup(t, w, target):
    return target * (1 - math.cos(math.pi * t / w)) / 2


# The original training: 40 steps, step decay 0.1 -> 0.01 at step 20 -> 0.001 at step 30.
ORIGINAL = [0.1] * 20 + [0.01] * 10 + [0.001] * 10


def test_ft_is_the_last_rate_constant():
    seen, _, _ = _run(lambda o: FT(o, final_lr=0.001, total_steps=10), 12)
    assert all(s == [0.001] for s in seen)


def test_lrw_replays_the_last_part_of_the_original():
    seen, _, _ = _run(lambda o: LRW(o, original_lrs=ORIGINAL, total_steps=15), 15)
    assert [s[0] for s in seen] == ORIGINAL[-15:]
    # Longer than the original: its first rate until the replay starts.
    seen, _, _ = _run(lambda o: LRW(o, original_lrs=ORIGINAL, total_steps=45), 45)
    assert [s[0] for s in seen] == [ORIGINAL[0]] * 5 + ORIGINAL


def test_slr_compresses_the_original_after_warmup():
    total, w = 20, 2  # int(0.1 * 20)
    seen, _, _ = _run(lambda o: SLR(o, original_lrs=ORIGINAL, total_steps=total), total)
    want = [_warmup(t, w, 0.1) for t in range(w)]
    want += [ORIGINAL[math.floor(j * len(ORIGINAL) / (total - w))] for j in range(total - w)]
    assert [s[0] for s in seen] == pytest.approx(want, rel=1e-12, abs=0)
    assert seen[0][0] == 0.0


def test_clr_is_one_cosine_cycle_after_warmup():
    total, w = 30, 3
    seen, _, _ = _run(lambda o: CLR(o, max_lr=0.1, min_lr=0.001, total_steps=total), total + 2)
    want = [_warmup(t, w, 0.1) for t in range(w)]
    want += [0.001 + (0.1 - 0.001) * (1 + math.cos(math.pi * j / (total - w))) / 2 for j in range(total - w)]
    want += [0.001, 0.001]  # past total_steps: the last rate
    assert [s[0] for s in seen] == pytest.approx(want, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("drop,density,steps,orig,expected", [
    (0.3, 0.8, 10, 100, 0.1 * 0.3 / math.sqrt(0.2)),   # inside the bounds
    (0.9, 0.5, 10, 100, 0.1),                          # capped at max_lr
    (0.01, 0.5, 10, 100, 0.1 * 10 / 100),              # floored at T / T_orig * max_lr
    (0.01, 0.5, 300, 100, 0.1),                        # floor min(T / T_orig, 1) = 1
])
def test_allr_initial_rate(drop, density, steps, orig, expected):
    assert allr_initial_lr(0.1, drop, density, steps, orig) == pytest.approx(expected, rel=1e-12)


def test_allr_is_linear_to_zero_after_warmup():
    total, w = 20, 2
    eta = 0.1 * 0.3 / math.sqrt(0.2)
    seen, _, _ = _run(lambda o: ALLR(o, max_lr=0.1, relative_norm_drop=0.3, density=0.8, total_steps=total,
                                     original_steps=100), total + 1)
    want = [_warmup(t, w, eta) for t in range(w)]
    want += [eta * (1 - j / (total - w)) for j in range(total - w)] + [0.0]
    assert [s[0] for s in seen] == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_every_param_group_gets_the_rate_and_state_dict_resumes():
    opt = _opt(groups=2)
    sched = CLR(opt, max_lr=0.1, total_steps=10)
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == opt.param_groups[1]["lr"] == sched.lr_at(4)
    saved = sched.state_dict()
    opt2 = _opt(groups=2)
    sched2 = CLR(opt2, max_lr=0.1, total_steps=10)
    sched2.load_state_dict(saved)
    for _ in range(3):
        opt.step(), opt2.step()
        sched.step(), sched2.step()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_lr_trace_records_a_torch_schedule():
    trace = lr_trace(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [20, 30], gamma=0.1), 40, lr=0.1)
    assert trace == pytest.approx(ORIGINAL, rel=1e-12)


@pytest.mark.parametrize("make,match", [
    (lambda o: FT(o, final_lr=-1.0, total_steps=5), "final_lr"),
    (lambda o: FT(o, final_lr=0.1, total_steps=0), "total_steps"),
    (lambda o: LRW(o, original_lrs=[], total_steps=5), "original_lrs"),
    (lambda o: SLR(o, original_lrs=[0.1, float("nan")], total_steps=5), r"original_lrs\[1\]"),
    (lambda o: SLR(o, original_lrs=[0.1], total_steps=5, warmup_fraction=1.0), "warmup_fraction"),
    (lambda o: CLR(o, max_lr=0.01, min_lr=0.1, total_steps=5), "min_lr"),
    (lambda o: ALLR(o, max_lr=0.1, relative_norm_drop=0.2, density=0.0, total_steps=5, original_steps=9),
     "density"),
    (lambda o: ALLR(o, max_lr=0.1, relative_norm_drop=0.2, density=0.5, total_steps=5, original_steps=0),
     "original_steps"),
])
def test_bad_arguments_name_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make(_opt())


def test_allr_with_lottery_ticket_retraining():
    """IMP without rewinding (prune, retrain): ALLR built per round from the round's
    relative norm drop and density; round 0 trains with a plain constant rate."""
    from sparsekernels.methods import LotteryTicket

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    steps = 20  # warm-up: 2 steps

    def scheduler_fn(opt, rnd):
        if rnd.index == 0:
            return None
        return ALLR(opt, max_lr=0.05, relative_norm_drop=rnd.relative_norm_drop, density=rnd.density,
                    total_steps=steps, original_steps=steps)

    lt = LotteryTicket(model, lambda p: torch.optim.SGD(p, lr=0.05), rounds=3, rewind_step=None,
                       scheduler_fn=scheduler_fn)
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    rates = {}
    for rnd in lt.rounds():
        assert (rnd.scheduler is None) == (rnd.index == 0)
        assert (rnd.relative_norm_drop > 0) == (rnd.index > 0)
        for _ in range(steps):
            rnd.optimizer.zero_grad()
            nn.functional.cross_entropy(rnd.model(x), y).backward()
            rates.setdefault(rnd.index, []).append(rnd.optimizer.param_groups[0]["lr"])
            rnd.optimizer.step()
            if rnd.scheduler is not None:
                rnd.scheduler.step()
        if rnd.index:
            eta = allr_initial_lr(0.05, rnd.relative_norm_drop, rnd.density, steps, steps)
            want = [_warmup(t, 2, eta) for t in range(2)] + [eta * (1 - j / 18) for j in range(18)]
            assert rates[rnd.index] == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert rates[0] == [0.05] * steps
