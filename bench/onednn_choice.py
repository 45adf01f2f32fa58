"""What minisd.fast.choose_onednn measures and chooses on this machine, and what that costs, for a model file.

    python bench/onednn_choice.py FILE
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python bench/onednn_choice.py FILE   # an emulated AVX2-only CPU
"""
import sys
import time

import common

from minisd import fast
from minisd.pipeline import Pipeline

if __name__ == "__main__":
    print(common.cpu_flags())
    pipe = Pipeline.load(sys.argv[1], device="cpu", dtype="fp32", log=lambda *_: None, prepack=False)
    t0 = time.perf_counter()
    chosen = fast.choose_onednn(pipe.model, log=print)
    print(f"choose_onednn took {time.perf_counter() - t0:.1f} s (load average {__import__('os').getloadavg()[0]:.1f})")
