"""Reading a transformers model folder (what `save_pretrained` writes and the Hub serves): `config.json` and the
weights in whichever of transformers' four forms the folder holds, first found wins as in transformers:

    model.safetensors                   one file
    model.safetensors.index.json        {"weight_map": {tensor name: shard file}} beside the shards
    pytorch_model.bin                   the older pickle, read through io.unpickle_ckpt's restricted unpickler
    pytorch_model.bin.index.json        the same index over .bin shards

`read_weights` returns one name -> tensor Mapping over all shards; safetensors shards are opened lazily and each
tensor is read when indexed (io.SafetensorsFile), a .bin shard is unpickled when one of its tensors is first asked
for. BLIP and BLIP-2 (minisd/caption/) read their folders through it.
"""
import json
from collections.abc import Mapping
from pathlib import Path

from .io import CheckpointError, read_checkpoint

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def read_config(folder, name="config.json"):
    """The folder's JSON file `name` as a dict; a one-line error when it is missing or not JSON."""
    path = Path(folder) / name
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {name} (not a transformers model folder?)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


class ShardedWeights(Mapping):
    """name -> tensor over the shards an index names; each shard file is opened when first needed."""

    def __init__(self, folder, weight_map):
        self.folder = Path(folder)
        self.weight_map = weight_map
        self._open = {}
        for shard in sorted(set(weight_map.values())):
            if not (self.folder / shard).is_file():
                raise CheckpointError(f"{self.folder}: the index names shard {shard!r}, which is not there")

    def _shard(self, name):
        shard = self.weight_map[name]
        if shard not in self._open:
            self._open[shard] = read_checkpoint(self.folder / shard)
        return self._open[shard]

    def __getitem__(self, name):
        tensors = self._shard(name)
        if name not in tensors:
            raise CheckpointError(f"{self.folder / self.weight_map[name]}: tensor {name!r} named by the index is "
                                  f"not in it")
        return tensors[name]

    def __iter__(self):
        return iter(self.weight_map)

    def __len__(self):
        return len(self.weight_map)

    def shape(self, name):
        return tuple(self._shard(name).shape(name))


def read_weights(folder):
    """All tensors of a transformers folder as one Mapping (see the module docstring for the forms read)."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return read_checkpoint(path)
        index = read_config(folder, name)
        if not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{path}: no 'weight_map' in this index")
        return ShardedWeights(folder, index["weight_map"])
    raise CheckpointError(f"{folder}: no weights found (expected one of {', '.join(WEIGHT_FILES)})")
