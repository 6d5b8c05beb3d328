"""The seed's two CNNs: a teacher of three conv blocks and a simpler student, both with BN.

A block is `convs` x (3x3 conv, BatchNorm, ReLU) followed by 2x2 max-pooling; the width
doubles per block. The classifier is flatten -> hidden -> ReLU -> dropout -> classes.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_ddp.config import Config, ConfigError


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    # bias=False: BatchNorm's shift makes a conv bias redundant.
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ConvNet(nn.Module):
    def __init__(self, *, blocks: int, convs: int, width: int, hidden: int, num_classes: int,
                 image_size: int, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for b in range(blocks):
            cout = width * 2**b
            for c in range(convs):
                layers += _conv_bn_relu(cin if c == 0 else cout, cout)
            layers.append(nn.MaxPool2d(2))
            cin = cout
        self.features = nn.Sequential(*layers)
        side = image_size // 2**blocks
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(cin * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# name -> (blocks, convs per block)
ARCHITECTURES = {
    "teacher_cnn": (3, 2),
    "teacher_cnn_lite": (3, 1),
    "student_cnn": (2, 1),
}


def build_model(cfg: Config, role: str, num_classes: int) -> nn.Module:
    """`role` is "teacher" or "student"; the architecture name and sizes come from cfg.model."""
    m = cfg.model
    name, width, hidden = (
        (m.teacher, m.teacher_width, m.teacher_hidden) if role == "teacher"
        else (m.student, m.student_width, m.student_hidden)
    )
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown model {name!r}; models: {', '.join(ARCHITECTURES)}")
    blocks, convs = ARCHITECTURES[name]
    if cfg.data.image_size % 2**blocks:
        raise ConfigError(f"data.image_size={cfg.data.image_size} must be divisible by {2**blocks} for {name}")
    return ConvNet(blocks=blocks, convs=convs, width=width, hidden=hidden, num_classes=num_classes,
                   image_size=cfg.data.image_size, dropout=m.dropout)
