"""Speed claims measured in CPU seconds rather than wall time: on a loaded machine (CI beside other jobs, `pytest -n
auto` on 2 cores) a process also waits for a core, and its wall time measures the machine rather than the code."""

from __future__ import annotations

import resource
import subprocess


def run_counting_cpu(command: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    """subprocess.run(command, **kwargs) and the CPU seconds (user + system) the child process used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, **kwargs)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return done, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
