"""Evaluate a run's trained teacher on the test split; run plainly or under torchrun.

Prints one JSON line on rank 0: {"test_loss", "test_acc", "world_size"}.
"""

import json
import sys

from kd_ddp import distributed
from kd_ddp.config import load_config
from kd_ddp.data import EvalLoader, prepare_data
from kd_ddp.train import amp_dtype, evaluate, load_trained_teacher

cfg = load_config(sys.argv[1], sys.argv[2:])
env = distributed.setup(cfg)
data = prepare_data(cfg, env)
teacher, _ = load_trained_teacher(cfg, data, env)
mean, std = data.stats(env.device)
loss, acc = evaluate(teacher, EvalLoader(cfg, data, env), env, mean, std, cfg, amp_dtype(cfg, env.device))
if env.is_main:
    print(json.dumps({"test_loss": loss, "test_acc": acc, "world_size": env.world_size}), flush=True)
distributed.teardown()
distributed.end_process(0)  # see its docstring: a clean exit after DDP under torch 2.14
