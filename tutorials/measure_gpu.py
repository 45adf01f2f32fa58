"""Measure what tutorial 9 reports: time and peak GPU memory of one txt2img at each real configuration.

    python tutorials/measure_gpu.py tutorials/09_gpu_measurements.json      # needs a CUDA GPU

The networks get random weights (no checkpoint is needed or downloaded): time and memory depend on the shapes, not
on the values. Each configuration runs minisd's default generation (DPM++ 2M Karras, 20 steps, CFG 7.5, batch 1,
fp16 with the VAE decode in fp32, the model's own size) once to warm up, then `repeats` times; the median wall time
and the peak of torch.cuda.max_memory_allocated are recorded. Loading time is not included.
"""
import json
import statistics
import sys
import time

import torch

from minisd.config import SD15, SD21_BASE, SD21_V
from minisd.model import StableDiffusion
from minisd.pipeline import Pipeline


def measure(config, repeats=3, steps=20):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = StableDiffusion(config)
    pipe = Pipeline(model, device=torch.device("cuda"), dtype=torch.float16, log=lambda *_: None)
    weights = torch.cuda.memory_allocated()
    pipe.generate("a castle at dusk", steps=2, seed=0)                    # warm-up: cuDNN autotuning, allocator
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for seed in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pipe.generate("a castle at dusk", steps=steps, seed=seed)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    result = {"model": config.name, "size": config.image_size, "steps": steps,
              "seconds_per_image": round(statistics.median(times), 3),
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2),
              "weights_gib": round(weights / 2 ** 30, 2)}
    del pipe, model
    torch.cuda.empty_cache()
    return result


def main(path):
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d", time.gmtime()),
               "setup": "random weights; default sampler (DPM++ 2M Karras), CFG 7.5, batch 1, fp16 U-Net and "
                        "text encoder, fp32 VAE; median of 3 after a warm-up; load time excluded",
               "runs": [measure(c) for c in (SD15, SD21_BASE, SD21_V)]}
    print(json.dumps(results, indent=1))
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
