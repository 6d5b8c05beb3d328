"""Each rank's first dropout mask after a Trainer is built: one JSON line per rank,
{"rank", "mask"} (the mask's sha256), to show that ranks draw different masks."""

import hashlib
import json
import sys

import torch

from kd_ddp import distributed
from kd_ddp.config import load_config
from kd_ddp.data import prepare_data
from kd_ddp.train import Trainer

cfg = load_config(sys.argv[1], sys.argv[2:])
env = distributed.setup(cfg)
data = prepare_data(cfg, env)
trainer = Trainer(cfg, env, data, "teacher")
trainer.close()
# what the teacher's dropout layer would draw at the first step: the rank's stream
mask = torch.nn.functional.dropout(torch.ones(4096), p=cfg.model.dropout, training=True) > 0
print(json.dumps({"rank": env.rank, "mask": hashlib.sha256(mask.numpy().tobytes()).hexdigest()}), flush=True)
distributed.teardown()
