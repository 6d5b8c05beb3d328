from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd_ddp.losses import kd_loss, mse_onehot_loss, teacher_loss

pytestmark = pytest.mark.fast  # in-process unit tests (tests/conftest.py)


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_kd_loss_matches_hand_computation() -> None:
    s = [[1.0, 2.0, 0.5]]
    t = [[0.0, 3.0, -1.0]]
    y = [1]
    alpha, temp = 0.3, 2.0
    p_s = _softmax([v / temp for v in s[0]])
    p_t = _softmax([v / temp for v in t[0]])
    kl = sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
    ce = -math.log(_softmax(s[0])[y[0]])
    expected = alpha * ce + (1 - alpha) * temp**2 * kl
    got = kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), alpha, temp)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kd_limits() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(16, 10), torch.randn(16, 10)
    y = torch.randint(0, 10, (16,))
    assert kd_loss(s, t, y, 1.0, 4.0).item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    # alpha=0 with the teacher equal to the student: KL is zero
    assert kd_loss(s, s.clone(), y, 0.0, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    # batchmean: the KL term is a mean over samples, so duplicating the batch changes nothing
    a = kd_loss(s, t, y, 0.0, 3.0)
    b = kd_loss(torch.cat([s, s]), torch.cat([t, t]), torch.cat([y, y]), 0.0, 3.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_mse_onehot() -> None:
    logits = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([0, 1])
    assert mse_onehot_loss(logits, y, "logits").item() == pytest.approx(0.25)
    p = torch.softmax(logits, 1)
    expected = ((p - F.one_hot(y, 2)) ** 2).mean().item()
    assert mse_onehot_loss(logits, y, "softmax").item() == pytest.approx(expected)


def test_teacher_loss_is_ce() -> None:
    s, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    assert teacher_loss(s, y).item() == pytest.approx(F.cross_entropy(s, y).item())
