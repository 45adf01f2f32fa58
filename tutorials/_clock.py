"""Where a tutorial's time goes: its phases timed in its own output, with the machine they ran on.

    clock = Clock()                     # prints the CPU (model, AVX2 / AVX-512) and torch's kernels and threads
    with clock("class images"):
        ...                             # prints "[class images: 8.1 s, CPU 8.0 s]" when the block ends
    clock.summary()                     # every phase, and the total since Clock()

Wall time is what a reader waits. CPU time (this process's, all its threads, and that of the processes it ran and
waited for, such as a sweep's trials) is the same figure on a machine busy with other work, where the wall time
grows and the CPU time barely does; the tutorials run one thread, so on an idle machine the two agree. The figures
on a rendered page are those of the machine its clock names.
"""
import os
import platform
import time
from contextlib import contextmanager

import torch


def machine():
    """'AMD EPYC, AVX2 yes, AVX-512 no; torch 2.14.1 with AVX2 kernels, 1 thread' (the CPU from /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), None
    try:
        with open("/proc/cpuinfo") as f:
            first = {key.strip(): value for key, value in (line.split(":", 1) for line in
                                                            f.read().split("\n\n")[0].splitlines() if ":" in line)}
        model, flags = first["model name"].strip(), set(first["flags"].split())
    except (OSError, KeyError):
        pass
    isa = ("CPU flags unknown" if flags is None else
           f"AVX2 {'yes' if 'avx2' in flags else 'no'}, AVX-512 {'yes' if 'avx512f' in flags else 'no'}")
    threads = torch.get_num_threads()
    return (f"{model}, {isa}; torch {torch.__version__.split('+')[0]} with "
            f"{torch.backends.cpu.get_cpu_capability()} kernels, {threads} thread{'s' * (threads > 1)}")


def cpu_seconds():
    """CPU time of this process and of its finished child processes, user and system."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Clock:
    def __init__(self):
        self.phases = []                                # (name, wall s, CPU s)
        self.start = time.perf_counter(), cpu_seconds()
        print(machine())

    @contextmanager
    def __call__(self, name):
        wall, cpu = time.perf_counter(), cpu_seconds()
        yield
        self.phases.append((name, time.perf_counter() - wall, cpu_seconds() - cpu))
        print(f"[{name}: {self.phases[-1][1]:.1f} s, CPU {self.phases[-1][2]:.1f} s]")

    def summary(self):
        """The phases and the total since Clock() (the rest: loading, figures, the short cells)."""
        total = time.perf_counter() - self.start[0], cpu_seconds() - self.start[1]
        width = max(len(name) for name, _, _ in self.phases + [("total", 0, 0)])
        print(f"{'':{width}}  wall s   CPU s")
        for name, wall, cpu in self.phases + [("rest", total[0] - sum(p[1] for p in self.phases),
                                               total[1] - sum(p[2] for p in self.phases)), ("total", *total)]:
            print(f"{name:{width}}  {wall:6.1f}  {cpu:6.1f}")
        print(machine())
