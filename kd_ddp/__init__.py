"""kd-ddp: knowledge distillation on CIFAR-10, from one CPU process to N GPUs."""

__version__ = "0.1.0"
