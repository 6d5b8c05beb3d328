"""This process's resident memory, read without importing torch (benchmarks time the import).

Read from /proc by hand rather than with psutil (a dependency since kd_ddp/doctor.py): psutil
gives the current RSS but not the peak (VmHWM), which is the number the summaries need, so it
would replace one of the two reads and leave the other.
"""

from __future__ import annotations

import resource
from pathlib import Path


def rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS so far) in MB. The peak is VmHWM, not ru_maxrss: ru_maxrss survives
    execve, so a process started by a big parent (a benchmark driver) would report the parent's peak."""
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
                      if ":" in line)
        return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError):  # not Linux: the peak only (ru_maxrss is in KiB on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return peak, peak
