"""Scripts the tests run in their own processes, plainly or under torchrun (tests.conftest.run_worker).

Each takes a preset and config overrides as its arguments; the helpers below are the start and
the end they share.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from kd_ddp import distributed
from kd_ddp.config import Config, load_config
from kd_ddp.data import PreparedData, prepare_data
from kd_ddp.distributed import DistEnv


def start() -> tuple[Config, DistEnv, PreparedData]:
    """The config of `WORKER PRESET OVERRIDE...`, this process's place in its group, the prepared data."""
    cfg = load_config(sys.argv[1], sys.argv[2:])
    env = distributed.setup(cfg)
    return cfg, env, prepare_data(cfg, env)


def finish() -> NoReturn:
    """Leave the process group and end the process with exit 0 (see distributed.end_process:
    a clean exit after DDP under torch 2.14)."""
    distributed.teardown()
    distributed.end_process(0)
