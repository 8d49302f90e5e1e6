"""The CPU allocator thresholds: buffers of several MB, freed and allocated again in bursts (the
dequantized weights of NF4 layers, LoRA temporaries), reuse the process's memory instead of
glibc trimming the heap and faulting fresh pages in at the next burst."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

BURSTS = """
import resource, sys, torch
from loraplex.model import cpu_malloc
tuned = sys.argv[1] == "tuned" and cpu_malloc.tune()
def burst():
    held = [torch.empty(2 * 2**20).fill_(1.0) for _ in range(16)]  # 16 buffers of 8 MiB live at once
    del held
def minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
burst()
start = minor_faults()
for _ in range(10):
    burst()
print(tuned, minor_faults() - start)
"""


def _faults(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", BURSTS, mode], capture_output=True, text=True, check=True, timeout=120)
    tuned, faults = out.stdout.split()
    return tuned == "True", int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's")
def test_tuned_process_reuses_freed_buffers_instead_of_faulting_in_new_pages() -> None:
    applied, tuned = _faults("tuned")
    assert applied
    _, untuned = _faults("untuned")
    pages = 10 * 16 * 8 * 2**20 // 4096  # every burst faulting in all its pages
    assert untuned > pages // 10, untuned  # the case is real: glibc trims, the next burst faults again (seen: 20-100%)
    assert tuned < pages // 10, tuned  # seen: 1-5%
