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
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(40, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(4096, 40), torch.randint(0, 10, (4096,))

    def step():  # activations of 1-4 MiB, allocated and freed every step
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
""")



def faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    # glibc's defaults fault in about a thousand fresh pages per step here; kept memory a small part of
    # that (the kernel may still reclaim idle pages of a long-lived heap)
    kept, default = faults_per_step("keep"), faults_per_step("default")
    assert kept * 3 < default, f"page faults per training step: {kept} with freed memory kept, {default} without"


def test_switched_off_by_the_environment(monkeypatch):
    from fastsgd.study.steps.allocator import keep_freed_memory
    monkeypatch.setenv("FASTSGD_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False
