"""Evaluate a run's trained teacher on the test split; run plainly or under torchrun.

Prints one JSON line on rank 0: {"test_loss", "test_acc", "world_size"}.
"""

import json

from kd_ddp.data import EvalLoader
from kd_ddp.evaluation import evaluate
from kd_ddp.precision import amp_dtype
from kd_ddp.teachers import load_trained_teacher
from tests.workers import finish, start

cfg, env, data = start()
teacher, _ = load_trained_teacher(cfg, data, env)
mean, std = data.stats(env.device)
loss, acc = evaluate(teacher, EvalLoader(cfg, data, env), env, mean, std, cfg, amp_dtype(cfg, env.device))
if env.is_main:
    print(json.dumps({"test_loss": loss, "test_acc": acc, "world_size": env.world_size}), flush=True)
finish()
