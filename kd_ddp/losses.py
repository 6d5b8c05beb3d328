"""The three training objectives, as pure functions of logits and targets."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def teacher_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def mse_onehot_loss(logits: torch.Tensor, labels: torch.Tensor, on: str = "logits") -> torch.Tensor:
    """The seed's "normal" student loss: MSE against one-hot labels.

    `on="logits"` regresses the raw outputs onto {0, 1} as the seed notebook does;
    `on="softmax"` compares probabilities (the Brier score), whose gradients are smaller.
    """
    outputs = logits.float()
    if on == "softmax":
        outputs = outputs.softmax(dim=1)
    target = F.one_hot(labels, num_classes=outputs.shape[1]).to(outputs.dtype)
    return F.mse_loss(outputs, target)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            alpha: float, temperature: float) -> torch.Tensor:
    """alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T)).

    KL is averaged over the batch ("batchmean"), the mathematically correct reduction; the
    T^2 factor keeps the soft term's gradient scale independent of T (Hinton et al. 2015).
    """
    s = student_logits.float()
    ce = F.cross_entropy(s, labels)
    log_p_student = F.log_softmax(s / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return alpha * ce + (1.0 - alpha) * temperature**2 * kl


def ensemble_logits(member_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The ensemble of `member_logits` [members, batch, classes] at `temperature`, as logits:
    T * log(mean_i softmax(z_i / T)), whose softmax at T is the mean of the members'
    probabilities exactly (kd_loss takes them as a teacher's logits). At T = 1 their argmax is
    the ensemble's prediction."""
    z = member_logits.float() / temperature
    n = member_logits.shape[0]
    return temperature * (torch.logsumexp(F.log_softmax(z, dim=-1), dim=0) - math.log(n))
