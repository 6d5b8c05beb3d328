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


def _batch(n: int = 16, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(student logits, teacher logits, labels) of a seeded random batch."""
    torch.manual_seed(0)
    return torch.randn(n, classes), torch.randn(n, classes), torch.randint(0, classes, (n,))


def test_kd_limits() -> None:
    s, t, y = _batch()
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


def test_teacher_loss_smooths_labels_as_hand_computed() -> None:
    """Label smoothing eps over K classes: (1 - eps) * -log p_y + eps/K * sum_k -log p_k; the
    true class keeps its weight, the rest is spread over every class, the true one included."""
    logits, y, eps = [2.0, 0.0, -1.0], 0, 0.1
    log_p = [math.log(p) for p in _softmax(logits)]
    expected = -(1 - eps) * log_p[y] - eps / len(logits) * sum(log_p)
    got = teacher_loss(torch.tensor([logits]), torch.tensor([y]), label_smoothing=eps)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert teacher_loss(torch.tensor([logits]), torch.tensor([y])).item() == pytest.approx(-log_p[y], rel=1e-6)


def test_teacher_loss_scores_half_precision_logits_in_float32() -> None:
    """Autocast hands over bf16 logits: the loss is taken in float32, as of the logits made float."""
    torch.manual_seed(0)
    logits, y = (torch.randn(8, 10) * 8).bfloat16(), torch.randint(0, 10, (8,))
    got = teacher_loss(logits, y, label_smoothing=0.1)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(teacher_loss(logits.float(), y, label_smoothing=0.1).item(), rel=1e-6)


def test_kd_soft_term_gradient_keeps_its_scale_across_temperatures() -> None:
    """The T^2 factor (Hinton et al. 2015): the soft term's gradient on the student logits tends,
    as T grows, to (centred s - t) / (K * N), off by O(1/T); without it the gradient falls as 1/T^2."""
    s0, t, y = _batch()

    def soft_grad(temperature: float) -> torch.Tensor:
        s = s0.clone().requires_grad_()
        kd_loss(s, t, y, 0.0, temperature).backward()
        return s.grad

    d = s0 - t
    limit = (d - d.mean(dim=1, keepdim=True)) / d.numel()
    torch.testing.assert_close(soft_grad(100.0), limit, rtol=0, atol=0.02 * limit.abs().max().item())
    assert soft_grad(4.0).norm().item() == pytest.approx(soft_grad(8.0).norm().item(), rel=0.01)
