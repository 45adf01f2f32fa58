"""Several processes, one job: what minisd needs from torch.distributed when launched by `torchrun`.

    torchrun --nproc-per-node 4 -m minisd train finetune ...                         # 4 GPUs, one machine
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m minisd train ...

torchrun starts one process per GPU and gives each RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in
its environment. `setup` reads them: with WORLD_SIZE > 1 it joins the process group (nccl for CUDA, gloo on the
CPU) and returns the device of this process (cuda:LOCAL_RANK); without them nothing is initialised and every
function here answers as for one process (rank 0 of 1), so a plain `minisd train` runs exactly as before.

What the processes share is the process group torch.distributed keeps; nothing else is global here.

A process that dies (killed, out of memory, a node lost) breaks the connections of the others: their next
collective call fails (gloo at once; nccl when its watchdog gives up, after TIMEOUT at most) and torchrun stops
the rest of the job. Every collective here turns that failure into PeerLost, whose message is one line that says
what to do (the command lines print it and exit 3).
"""
import datetime
import os
import re

import torch
import torch.distributed as dist

from .devices import pick_device

# A collective waits this long for a slow peer before failing. Rank 0 alone writes checkpoints, sample images and
# the final model while the others wait at the next gradient average, so it must cover the slowest of those
# writes (minutes for a full SD model on a slow disk), not only a training step.
TIMEOUT = datetime.timedelta(minutes=30)


class PeerLost(RuntimeError):
    """A collective failed: another process of the job stopped or cannot be reached."""


def _collective(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        first = re.sub(r"^\[[^\]]*\]\s*", "", first)          # gloo's "[.../pair.cc:545] " source location
        raise PeerLost(f"another process of this {world_size()}-process job stopped or cannot be reached (rank "
                       f"{rank()}: {first[:160]}); rerun the same command with --resume to continue from the last "
                       f"checkpoint") from None


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main():
    """Rank 0: the one process that writes files, logs and prints."""
    return rank() == 0


def main_only(log):
    """`log` on rank 0, a function that prints nothing on the others."""
    return log if is_main() else (lambda *_: None)


def setup(device_choice="auto"):
    """Join the job torchrun started (when WORLD_SIZE > 1 and not joined yet) and return this process's device:
    cuda:LOCAL_RANK under CUDA, else what `pick_device(device_choice)` gives."""
    device = pick_device(device_choice)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"process {local_rank} of this machine has no GPU of its own ({torch.cuda.device_count()}"
                             f" here): --nproc-per-node must be at most the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)           # nccl's collectives run on the current device
    elif device.type != "cpu":
        raise ValueError(f"several processes run on CUDA (nccl) or the CPU (gloo), not on {device.type}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT,
                                **({"device_id": device} if device.type == "cuda" else {}))
    return device


def shutdown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if world_size() > 1:
        _collective(dist.barrier)


def shard(items):
    """This process's share of `items`: every world_size-th, from its rank (rank r of W takes r, r + W, ...)."""
    return items[rank()::world_size()]


def average_gradients(params, bucket_bytes=64 * 2**20):
    """Replace each parameter's .grad by its mean over the processes: one all-reduce per bucket of gradients
    flattened together (tens of all-reduces for a U-Net rather than ~700, one per tensor). Parameters without a
    gradient are skipped; every process has the same ones (the same graph runs on each)."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket, size = [], 0
    for i, g in enumerate(grads):
        bucket.append(g)
        size += g.numel() * g.element_size()
        last = i + 1 == len(grads)
        if size >= bucket_bytes or last or grads[i + 1].dtype != g.dtype:
            flat = torch.cat([t.reshape(-1) for t in bucket])
            _collective(dist.all_reduce, flat)                    # sum over the processes ...
            flat /= world_size()                                  # ... then the mean
            for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
                t.copy_(part.view_as(t))
            bucket, size = [], 0


def mean(value: float, device):
    """The mean of a number over the processes (each process's loss -> the loss logged)."""
    if world_size() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    _collective(dist.all_reduce, t)
    return t.item() / world_size()


def broadcast_(tensors, device):
    """Every process takes rank 0's values of `tensors` (in place): the weights start equal everywhere even when a
    method initialises some of them at random."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for t in tensors:
            _collective(dist.broadcast, t.data, src=0)


def broadcast_object(box):
    """box[0] of rank 0 into box[0] of every process (a small picklable object: a path, a list of names)."""
    if world_size() > 1:
        _collective(dist.broadcast_object_list, box, src=0)


def agree(value: int, device):
    """(min, max) of an integer over the processes."""
    if world_size() == 1:
        return value, value
    t = torch.tensor([value, -value], dtype=torch.int64, device=device)
    _collective(dist.all_reduce, t, op=dist.ReduceOp.MAX)
    return -int(t[1]), int(t[0])

