"""keep_freed_memory: after it, a step's large allocations reuse freed memory instead of faulting in
fresh pages every time (run in a fresh interpreter: it changes the process's malloc)."""
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from fastsgd.study.steps.allocator import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    x = torch.randn(1 << 20)  # 4 MiB

    def faults(reps=20):
        for _ in range(3):
            (x * 2).relu()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(reps):  # a "step": two fresh 4 MiB temporaries, freed at once
            (x * 2).relu()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / reps
    print(faults())
""")


def faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    kept = faults_per_step("keep")
    assert kept < 50, f"{kept} page faults per step with freed memory kept"  # 4 MiB fresh would be ~1000
    default = faults_per_step("default")
    assert default > 10 * max(kept, 1), (default, kept)  # what the setting is for: glibc's default faults


def test_switched_off_by_the_environment(monkeypatch):
    from fastsgd.study.steps.allocator import keep_freed_memory
    monkeypatch.setenv("FASTSGD_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False
