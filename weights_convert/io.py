"""Reading and writing checkpoint files one tensor at a time.

A 4.3 GB Stable Diffusion file must not sit in RAM twice. safetensors is a tiny format (an 8-byte header
length, a JSON header of name -> dtype/shape/byte range, then the raw bytes), so we read it ourselves, with a
clear error when the file is truncated. Each tensor is a private memory map of its own byte range: loading
reads nothing, the operating system pages the bytes in when a weight is first used (from its page cache, so the
file is never in RAM twice), and a tensor that is cast to another dtype or device is unmapped as soon as the
cast copy exists.

`.ckpt` files are pickles, and unpickling can call any function the file names (`os.system`, ...). They are
opened only with `torch.load(weights_only=True)`: torch's restricted unpickler, which calls nothing but the
tensor-rebuild functions, storages and plain containers, builds no other object, and refuses any other name.
Training checkpoints (PyTorch Lightning) also pickle loop counters, numpy scalars and callback state keyed by
the callback's class; the few such names listed in STAND_INS are given to that same unpickler, for the one
call, mapped to inert stand-ins defined here (the real classes are never imported). Any other name in the
pickle is refused before anything is unpickled, with an error that names it.

Why torch's unpickler and not our own `pickle.Unpickler` with a restricted `find_class`: restricting the names
is not enough, as a standard unpickler still applies BUILD / SETITEMS / APPENDS to whatever the allowed names
produce (BUILD on an allowed *class* sets attributes on it, process-wide); torch's also restricts those opcodes
to tensors, plain containers and the allowlisted types, and it reads storages as torch.load always has.
"""
import json
import mmap
import os
import struct
import tempfile
import zipfile
from collections.abc import Mapping

import numpy
import torch

# safetensors dtype names (https://github.com/huggingface/safetensors, "Format")
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match what we expect; the message names the problem."""


class Tensors(Mapping):
    """name -> tensor held in memory (a loaded `.ckpt`, or tensors a conversion computed).

    `pop` hands a tensor over and forgets it, so a loader that moves tensors into a model one by one never
    holds a second full copy.
    """

    def __init__(self, tensors, metadata=None):
        self._tensors = dict(tensors)
        self.metadata = dict(metadata or {})

    def __getitem__(self, name):
        return self._tensors[name]

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self):
        return len(self._tensors)

    def shape(self, name):
        return tuple(self._tensors[name].shape)

    def pop(self, name):
        return self._tensors.pop(name)


class SafetensorsFile(Mapping):
    """name -> tensor of a .safetensors file; each tensor is read from disk when it is indexed."""

    def __init__(self, path):
        self.path = str(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100_000_000):
                raise CheckpointError(f"{self.path}: not a safetensors file, or truncated "
                                      f"(header claims {n} bytes, file has {size})")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupted safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._entries = header
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self._start + end > size:
            first = next(k for k, e in header.items() if self._start + e["data_offsets"][1] > size)
            raise CheckpointError(f"{self.path}: truncated safetensors file: {size} bytes, the header needs "
                                  f"{self._start + end} (first incomplete tensor: {first!r})")

    def __getitem__(self, name):
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        offset = self._start + begin
        if end == begin:
            return torch.empty(entry["shape"], dtype=dtype)
        if offset % dtype.itemsize:          # not aligned for its dtype (never in files safetensors writes): copy
            data = torch.empty(end - begin, dtype=torch.uint8)
            with open(self.path, "rb") as f:
                f.seek(offset)
                if f.readinto(data.numpy()) != end - begin:
                    raise CheckpointError(f"{self.path}: truncated while reading {name!r}")
            return data.view(dtype).reshape(entry["shape"])
        # A map must start on a page boundary: map from the page holding the first byte. ACCESS_COPY makes it
        # private and writable (a write copies that page instead of changing the file, e.g. when fine-tuning);
        # the tensor keeps the map alive, and the map closes when the last tensor using it is gone.
        page = offset - offset % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), offset + (end - begin) - page, access=mmap.ACCESS_COPY, offset=page)
        data = torch.frombuffer(mapped, dtype=torch.uint8, count=end - begin, offset=offset - page)
        return data.view(dtype).reshape(entry["shape"])

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)

    def shape(self, name):
        return tuple(self._entries[name]["shape"])

    pop = __getitem__   # reading from disk holds nothing to forget


class PickledStandIn:
    """Inert stand-in for a class a training checkpoint pickles (e.g. a Lightning callback): it records the
    arguments and the state the pickle hands it, and has no other behaviour. `name` is the class it replaces."""
    name = None

    def __new__(cls, *args):          # the NEWOBJ opcode calls cls.__new__(cls, *args), REDUCE calls cls(*args)
        self = super().__new__(cls)
        self.args, self.state = args, None
        return self

    def __init__(self, *args):
        pass

    def __setstate__(self, state):   # the BUILD opcode
        self.state = state

    def __repr__(self):
        return f"<stand-in for {self.name}>"


def stand_in(name):
    """A distinct stand-in class per name: callback state is keyed by the class, so two must not collide."""
    return type(name.rsplit(".", 1)[1], (PickledStandIn,), {"name": name})


NumpyDtype = stand_in("numpy.dtype")   # pickled as numpy.dtype("i8", False, True), then BUILD (3, "<", ...)
NumpyScalar = stand_in("numpy.core.multiarray.scalar")
NUMPY_NUMBERS = {"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"}


def numpy_scalar(dtype, data):
    """numpy's pickled scalar, `scalar(dtype, raw bytes)`, as a Python bool/int/float/complex; a scalar of any
    other dtype stays inert. Only numpy.frombuffer reads the bytes: nothing from the file is called."""
    code = dtype.args[0] if isinstance(dtype, NumpyDtype) and dtype.args else None
    if code in NUMPY_NUMBERS and isinstance(data, bytes):
        order = dtype.state[1] if isinstance(dtype.state, tuple) and len(dtype.state) > 1 else "="
        order = order if order in ("<", ">", "=", "|") else "="
        return numpy.frombuffer(data, numpy.dtype(code).newbyteorder(order), count=1)[0].item()
    return NumpyScalar(dtype, data)


# Names a training .ckpt pickles besides what torch's weights_only unpickler already accepts, and what they
# load as. This is the whole list: a pickle naming anything else is refused.
STAND_INS = {
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint":
        stand_in("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint":        # Lightning 2's package name
        stand_in("lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"),
    "numpy.dtype": NumpyDtype,
    "numpy.core.multiarray.scalar": numpy_scalar,
    "numpy._core.multiarray.scalar": numpy_scalar,                        # numpy 2's name for the module
    "torch.torch_version.TorchVersion": torch.torch_version.TorchVersion,  # torch's own `str` subclass
}


def unpickle_ckpt(path):
    """torch.load(weights_only=True) accepting STAND_INS too. torch's allowlist is process-wide; `safe_globals`
    extends it for the duration of the `with` only (a load in another thread meanwhile would accept the same
    inert stand-ins, nothing more). torch's own error for an unknown global buries its name under advice to
    retry with weights_only=False, so the pickle's names are first listed statically (torch's disassembler:
    nothing is unpickled) and an unknown one is refused by name. Any failure is a CheckpointError naming the
    file: a file that is neither a zip nor a pickle (a text file given by mistake) is "not a checkpoint"."""
    with open(path, "rb") as f:
        magic = f.read(2)
    is_zip = zipfile.is_zipfile(path)
    # a zip starts with PK (a truncated one is no longer is_zipfile), every pickle since protocol 2 with PROTO 0x80
    if not is_zip and magic != b"PK" and magic[:1] != b"\x80":
        raise CheckpointError(f"{path}: not a checkpoint (neither safetensors nor a torch.save zip or pickle)")
    with torch.serialization.safe_globals([(obj, name) for name, obj in STAND_INS.items()]):
        if is_zip:   # every torch.save since torch 1.6; torch.load checks the older format
            unknown = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
            if unknown:
                more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
                raise CheckpointError(f"{path}: refusing to load: its pickle names {unknown[0]!r}{more}, which is "
                                      "neither tensor data nor a known checkpoint class; unpickling could run code")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, KeyError) as e:
            raise CheckpointError(f"{path}: cannot read this .ckpt (truncated or corrupted?): "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        except Exception as e:  # the restricted unpickler's UnpicklingError; its specific reason follows a preamble
            lines = [line for line in str(e).splitlines() if line.strip()]
            reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line or "Can only" in line),
                          lines[0] if lines else type(e).__name__)
            raise CheckpointError(f"{path}: refusing to load: torch's weights_only unpickler refused it: "
                                  f"{reason.strip()}") from None


def read_checkpoint(path):
    """Open a .safetensors (lazily) or .ckpt/.pt/.bin (via torch.load(weights_only=True)) state dict."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        return SafetensorsFile(path)
    obj = unpickle_ckpt(path)
    # Lightning/LDM training checkpoints wrap the weights: {"state_dict": {...}, "global_step": ...}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        extras = {k: v for k, v in obj.items() if k != "state_dict"}
        obj = obj["state_dict"]
    else:
        extras = {}
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (optionally under 'state_dict')")
    metadata = {k: str(v) for k, v in extras.items() if isinstance(v, (int, float, str))}
    return Tensors(obj, metadata)


def check_shapes(ours, shapes, what, cfg):
    """Raise ValueError naming the first key of `ours` that `shapes` (name -> shape, the network built for `cfg`)
    does not have, then the first one it lacks, then the first of another shape. `what` names the network."""
    for k in ours:
        if k not in shapes:
            raise ValueError(f"unknown {what} key {k!r}")
    for k, shape in shapes.items():
        if k not in ours:
            raise ValueError(f"missing {what} key {k!r}")
        if tuple(ours[k].shape) != tuple(shape):
            raise ValueError(f"{what} key {k!r} has shape {tuple(ours[k].shape)}, expected {tuple(shape)} for {cfg}")


def umask():
    """The process's umask, read without changing it (Linux: /proc; elsewhere set and put back at once)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def temp_file_beside(path, prefix=None, suffix=".tmp"):
    """(fd, name) of a new temporary file in `path`'s folder, for a write that is then renamed over `path`: a
    unique name (two writers never share one), and the permissions a plain open() would give `path` (mkstemp's
    0600 is for secrets; images, models and checkpoints are shared like any file the user writes)."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}." if prefix is None else prefix, suffix=suffix)
    os.fchmod(fd, 0o666 & ~umask())
    return fd, tmp


def write_safetensors(path, tensors, metadata=None):
    """Write name -> tensor as .safetensors, streaming one tensor at a time (no second copy in RAM)."""
    header, offset = {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)   # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def write_ckpt(path, tensors):
    """Write a `.ckpt` the way LDM training did: the weights under "state_dict"."""
    torch.save({"state_dict": {k: v.contiguous() for k, v in tensors.items()}}, path)


class LazyState(Mapping):
    """minisd name -> tensor, where each tensor is fetched from its source (and transformed) only when asked.

    A layout converter fills it with `add(name, source, key, fn)`; the model loader then `pop`s tensors one
    at a time straight into the model. `origin(name)` is the key in the source file, for error messages.
    """

    def __init__(self):
        self._entries = {}

    def add(self, name, source, key=None, fn=None):
        self._entries[name] = (source, name if key is None else key, fn)

    def __getitem__(self, name):
        source, key, fn = self._entries[name]
        return fn(source[key]) if fn else source[key]

    def pop(self, name):
        source, key, fn = self._entries.pop(name)
        t = source.pop(key)
        return fn(t) if fn else t

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)

    def shape(self, name):
        source, key, fn = self._entries[name]
        shape = source.shape(key)
        return tuple(fn(torch.empty(shape, device="meta")).shape) if fn else shape

    def origin(self, name):
        return self._entries[name][1]
