"""Check the teacher-logits cache against the live teacher on the KD student's own batches.

For KD epochs 0..E-1 every rank walks its batches of the student's TrainLoader, builds the
exact pixels the student receives (view e % views), runs the live teacher on them and
compares with the cache's logits for those sample indices. Rank 0 prints one JSON line per
rank: {"rank", "batches", "max_abs_diff", "max_abs_diff_wrong_view", "max_abs_logit"}.
"""

import json

from kd_ddp import distributed
from kd_ddp.augment import StudentInput
from kd_ddp.data import TrainLoader
from kd_ddp.precision import amp_dtype
from kd_ddp.teacher_logits import LogitsCache, teacher_view_logits
from kd_ddp.teachers import load_trained_teacher
from tests.workers import finish, start

cfg, env, data = start()
teacher, teacher_record = load_trained_teacher(cfg, data, env)
cache = LogitsCache(cfg, data, teacher_record, env.device)
student_input = StudentInput.of(cfg, *data.stats(env.device))
loader = TrainLoader(cfg, data, env)
worst = worst_wrong = 0.0
batches = 0
for epoch in range(cfg.epochs_for("student")):
    view = epoch % cfg.kd.views
    for images, _, idx in loader.epoch(epoch):
        live = teacher_view_logits(teacher, images, idx, view, student_input, amp_dtype(cfg, env.device))
        cached = cache.lookup(view, idx).float()
        wrong = cache.lookup(view + 1, idx).float()
        worst = max(worst, (live - cached).abs().max().item())
        worst_wrong = max(worst_wrong, (live - wrong).abs().max().item())
        batches += 1
row = {"rank": env.rank, "batches": batches, "max_abs_diff": worst, "max_abs_diff_wrong_view": worst_wrong,
       "max_abs_logit": cache.table.float().abs().max().item()}
# gathered to rank 0, which prints every rank's line: lines of two ranks sharing a pipe can interleave
for r in distributed.all_gather_object(row, env):
    if env.is_main:
        print(json.dumps(r), flush=True)
finish()
