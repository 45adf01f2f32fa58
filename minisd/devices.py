"""Which device and dtype a model runs on: "auto" resolved, and the names a user may type."""
import torch


def pick_device(device="auto"):
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cuda", "cpu", "mps") and not str(device).startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; valid: auto, cuda, cpu, mps")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU (torch.cuda.is_available() "
                         "is False)")
    return torch.device(device)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_dtype(dtype, device):
    """auto: fp16 on CUDA (as diffusers users run SD), fp32 elsewhere (fp16 matmuls are slow or missing on CPU)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]
