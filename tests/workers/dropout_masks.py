"""Each rank's first dropout mask after a Trainer is built, gathered to rank 0, which prints
one JSON line: {"masks": [sha256 of rank 0's mask, of rank 1's, ...]} (one writer: lines of
two ranks sharing a pipe can interleave)."""

import hashlib
import json

import torch

from kd_ddp import distributed
from kd_ddp.train import Trainer
from tests.workers import finish, start

cfg, env, data = start()
trainer = Trainer(cfg, env, data, "teacher")
trainer.close()
# what the teacher's dropout layer would draw at the first step: the rank's stream
mask = torch.nn.functional.dropout(torch.ones(4096), p=cfg.model.dropout, training=True) > 0
masks = distributed.all_gather_object(hashlib.sha256(mask.numpy().tobytes()).hexdigest(), env)
if env.is_main:
    print(json.dumps({"masks": masks}), flush=True)
finish()
