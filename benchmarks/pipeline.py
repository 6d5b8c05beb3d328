"""Whole pipeline: `kd-ddp pipeline` vs the plain PyTorch script a user would otherwise write.

The plain script is the seed notebook's method done the textbook way, in one process:
torchvision `ImageFolder` over the JPEGs with PIL RandomCrop(32, padding=4) + flip,
`DataLoader(num_workers=cores)`, fp32 NCHW, evaluation after every epoch, and the teacher
run live in every KD step. It uses the same models, epochs, batch size, optimizer, LR
schedule and losses as the preset, so the accuracies are comparable and the wall-clocks
differ only by how the work is done. kd-ddp runs `kd-ddp pipeline` in a fresh run dir
with its data preparation (.npy, and .beton when FFCV loads: once per data set) counted in its total.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_ddp import losses, stages
from kd_ddp.config import Config, load_config
from kd_ddp.data import prepare_data
from kd_ddp.distributed import DistEnv, available_cores
from kd_ddp.models import build_model
from kd_ddp.sources import extract_archive
from kd_ddp.train import lr_at

REPO = Path(__file__).resolve().parents[1]
# (student logits, input batch, labels) -> loss; the batch is for the live teacher
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _evaluate(model: nn.Module, loader: Any) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def _fit(cfg: Config, role: str, train: Any, test: Any, loss_fn: LossFn) -> tuple[nn.Module, dict[str, float]]:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, role, 10)
    epochs = cfg.epochs_for(role)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr_for(role), momentum=cfg.optim.momentum,
                          nesterov=cfg.optim.nesterov, weight_decay=cfg.optim.weight_decay)
    total, warmup = epochs * len(train), int(cfg.warmup_for(role) * len(train))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, total, warmup))
    t0 = time.perf_counter()
    acc = 0.0
    for _ in range(epochs):
        model.train()
        for x, y in train:
            loss = loss_fn(model(x), x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = _evaluate(model, test)
    return model, {"test_acc": acc, "time_s": time.perf_counter() - t0}


def plain_script(cfg: Config, root: Path, mean: list[float], std: list[float]) -> dict[str, Any]:
    from torchvision import datasets, transforms

    norm = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    aug = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), *norm])
    workers = available_cores()
    train = torch.utils.data.DataLoader(datasets.ImageFolder(str(root / "train"), aug), shuffle=True,
                                        batch_size=cfg.optim.batch_size, num_workers=workers, drop_last=True,
                                        persistent_workers=True)
    test = torch.utils.data.DataLoader(datasets.ImageFolder(str(root / "test"), transforms.Compose(norm)),
                                       batch_size=cfg.train.eval_batch_size, num_workers=workers,
                                       persistent_workers=True)
    t0 = time.perf_counter()
    teacher, out_t = _fit(cfg, stages.TEACHER_ROLE, train, test, lambda s, x, y: losses.teacher_loss(s, y))
    teacher.eval()
    _, out_n = _fit(cfg, stages.STUDENT_ROLE, train, test,
                    lambda s, x, y: losses.mse_onehot_loss(s, y, cfg.kd.mse_input))

    def live_kd(s: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = teacher(x)
        return losses.kd_loss(s, t, y, cfg.kd.alpha, cfg.kd.temperature)

    _, out_k = _fit(cfg, stages.STUDENT_ROLE, train, test, live_kd)
    outs = dict(zip((s.key for s in stages.TRAINED), (out_t, out_n, out_k), strict=True))
    return {**outs, "total_s": time.perf_counter() - t0}


def kd_ddp_pipeline(preset: str, archive: str, work: Path) -> dict[str, Any]:
    run_dir = work / "kd-ddp-run"
    cmd = [sys.executable, "-m", "kd_ddp", "pipeline", "--preset", preset, f"run.dir={run_dir}",
           f"data.root={archive}", f"data.cache_dir={work / 'kd-ddp-cache'}", "tracking.wandb.mode=disabled",
           "tracking.progress=false"]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    total = time.perf_counter() - t0
    out: dict[str, Any] = {"total_s": total}
    for stage in stages.TRAINED:
        s = json.loads((run_dir / stage.name / "summary.json").read_text())
        out[stage.key] = {"test_acc": s["test_acc"], "time_s": s["train_time_s"]}
    out["cache_s"] = json.loads((run_dir / stages.CACHE.name / "manifest.json").read_text())["build_time_s"]
    return out


def run(archive: str, work: Path, preset: str = "quick") -> dict[str, Any]:
    cfg = load_config(preset, [f"data.root={archive}", f"data.cache_dir={work / 'plain-cache'}"])
    data = prepare_data(cfg, DistEnv())  # for the mean/std both sides normalize with
    root = extract_archive(Path(archive), cfg.cache_dir)
    plain = plain_script(cfg, root, data.meta["mean"], data.meta["std"])
    ours = kd_ddp_pipeline(preset, archive, work)
    return {"preset": preset, "plain": plain, "kd_ddp": ours, "speedup": plain["total_s"] / ours["total_s"],
            "epochs": {role: cfg.epochs_for(role) for role in stages.ROLES}}


def markdown(r: dict[str, Any]) -> str:
    p, k = r["plain"], r["kd_ddp"]
    rows = ["| stage | plain PyTorch: time (s) | accuracy | kd-ddp: time (s) | accuracy |", "|---|---|---|---|---|"]
    n = r["epochs"]
    names = {stages.TEACHER.key: f"teacher ({n[stages.TEACHER_ROLE]} epochs)",
             stages.STUDENT_NORMAL.key: f"student, normal ({n[stages.STUDENT_ROLE]} epochs)",
             stages.STUDENT_KD.key: f"student, KD ({n[stages.STUDENT_ROLE]} epochs; plain: live teacher)"}
    for key, name in names.items():
        rows.append(f"| {name} | {p[key]['time_s']:.0f} | {p[key]['test_acc']:.4f} | {k[key]['time_s']:.0f} | "
                    f"{k[key]['test_acc']:.4f} |")
    rows.append(f"| teacher-logits cache (kd-ddp only) | | | {k['cache_s']:.0f} | |")
    rows.append(f"| **whole run, wall-clock** (kd-ddp: with data preparation) | **{p['total_s']:.0f}** | | "
                f"**{k['total_s']:.0f}** | |")
    rows += ["", f"kd-ddp is **{r['speedup']:.2f}x** faster end to end at the {r['preset']} preset."]
    return "\n".join(rows)
