"""Training images from a Hugging Face `datasets` dataset: what `--dataset-name NAME_OR_PATH` points at (finetune,
lora, textual-inversion, controlnet), with diffusers' train_text_to_image flags:

    --dataset-name NAME_OR_PATH [--dataset-config-name C] [--dataset-split train]
    [--image-column image] [--caption-column text]
    [--conditioning-image-column conditioning_image]      (controlnet: diffusers' train_controlnet.py)

What NAME_OR_PATH is, first match:

1. a folder written by `save_to_disk` (it holds dataset_info.json and state.json, a Dataset, or dataset_dict.json,
   a DatasetDict): `datasets.load_from_disk`, which memory-maps its Arrow files and writes nothing there;
2. a parquet file, or a glob of them (`*.parquet`): `load_dataset("parquet", data_files=...)`;
3. a folder of images (diffusers' ImageFolder: captions in metadata.jsonl, splits as train/ test/ subfolders):
   `load_dataset("imagefolder", data_dir=...)`;
4. anything else, a Hub name ("lambdalabs/naruto-blip-captions") or another folder `datasets` understands:
   `load_dataset(NAME_OR_PATH, C)`, downloaded once into datasets' cache (HF_DATASETS_CACHE), not the folder.

The split is --dataset-split of a DatasetDict (diffusers takes dataset["train"]); a single saved Dataset is
used whole when it has no split of its own or that split. Rows are read in the dataset's order.

Each row gives an Example (data.py) whose `loader` decodes the row's image file, its stored bytes or the local file
imagefolder points at, with data.load_image, exactly as a file of --data is decoded (EXIF orientation, RGB), then
the same resize and crop: a folder and a dataset of the same images and captions train the same weights bit for
bit. A ControlNet's rows also give their --conditioning-image-column's image, decoded the same way
(Example.condition_loader), as a folder's NAME.cond.png is (control_data.py). Every image is decoded once here,
before any training, as data.find_examples does. The caption column holds a string or a list of strings: a list's
captions (stripped, as captions from files are) are alternatives, one drawn each time the example is used from the
example's own generator (batches.pick_caption; diffusers draws random.choice from the global RNG), so a resumed run
or one under torchrun sees the same caption; a list of one is that caption.

`datasets` is an optional dependency (`pip install -e ".[datasets]"`), imported only when --dataset-name is given.
"""
import dataclasses
import functools
import glob
import io
import os
from dataclasses import dataclass

from PIL import UnidentifiedImageError

from .data import IMAGE_EXTENSIONS, Example, check_resolution, find_examples, load_image
from .settings import folder_options

INSTALL = "--dataset-name needs the datasets package: pip install -e \".[datasets]\" (or pip install datasets)"


@dataclass(frozen=True)
class DatasetSettings:
    """--dataset-name and its companions, the settings of finetune, lora and textual-inversion besides --data."""
    dataset_name: str | None = None          # a Hub name, a save_to_disk folder, parquet file(s), an image folder
    dataset_config_name: str | None = None   # the Hub dataset's configuration, when it has several
    dataset_split: str = "train"
    image_column: str = "image"              # diffusers' defaults
    caption_column: str | None = "text"      # None (textual inversion): "text" if there is one, else templates


def check_source(cfg, method, others=()):
    """One-line errors unless exactly one source of images is given: --data, --dataset-name, or one of `others`
    ((flag, value) pairs, e.g. lora's --instance-dir)."""
    given = [flag for flag, value in (("--data", cfg.data), ("--dataset-name", cfg.dataset_name), *others) if value]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} are different sources of images; give one")
    if not given:
        names = ["--data DIR", "--dataset-name NAME_OR_PATH", *(f"{flag} DIR" for flag, _ in others)]
        raise ValueError(f"{method} needs {', '.join(names[:-1])} or {names[-1]}")


def training_examples(cfg, resolution, fallback_caption=None, log=print):
    """The examples of --data (data.find_examples) or of --dataset-name (dataset_examples)."""
    if cfg.dataset_name:
        return dataset_examples(cfg, resolution, fallback_caption, log)
    return find_examples(cfg.data, resolution, fallback_caption, log=log, **folder_options(cfg))


def import_datasets():
    """The datasets package, imported only here (it is optional), or a one-line error saying how to install it."""
    try:
        import datasets
    except ImportError:
        raise ValueError(INSTALL) from None
    return datasets


def is_saved(path):
    """A folder written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    has = lambda name: os.path.isfile(os.path.join(path, name))      # noqa: E731
    return os.path.isdir(path) and (has("dataset_dict.json") or (has("dataset_info.json") and has("state.json")))


def is_image_folder(path):
    """A folder with images in it or its subfolders (ImageFolder's train/ test/ splits) and no parquet files."""
    if not os.path.isdir(path):
        return False
    names = [n.lower() for _, _, files in os.walk(path) for n in files]
    return any(n.endswith(IMAGE_EXTENSIONS) for n in names) and not any(n.endswith(".parquet") for n in names)


def load(cfg):
    """(the split's datasets.Dataset, its name for messages) of cfg.dataset_name (module docstring)."""
    datasets = import_datasets()
    name, config, split = cfg.dataset_name, cfg.dataset_config_name, cfg.dataset_split
    saved, parquet, images = is_saved(name), name.endswith(".parquet"), is_image_folder(name)
    if config and (saved or parquet or images):
        raise ValueError(f"--dataset-config-name applies to Hub datasets, not to {name}")
    if parquet and not glob.glob(name):
        raise ValueError(f"{name} does not exist")
    try:
        if saved:
            data = datasets.load_from_disk(name)
        elif parquet:
            data = datasets.load_dataset("parquet", data_files=name, split=split)
        elif images:
            data = datasets.load_dataset("imagefolder", data_dir=name, split=split)
        else:
            data = datasets.load_dataset(name, config, split=split)
    except Exception as e:          # datasets raises many kinds (not found, offline, unknown split...): one line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"cannot load --dataset-name {name}: {reason}") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"{name} has no split {split!r} (--dataset-split); its splits: {', '.join(data)}")
        return data[split], f"{name}[{split}]"
    if saved and data.split is not None and str(data.split) != split:
        raise ValueError(f"{name} holds the split {str(data.split)!r} only, not {split!r}; pass --dataset-split "
                         f"{data.split}")
    return data, (name if saved else f"{name}[{split}]")


def is_string(feature, datasets):
    """A datasets.Value of text."""
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def caption_of(value, fallback, where):
    """A row's caption: a string, or a list of alternatives (a tuple; one string if there is one), stripped;
    `fallback` where there is none."""
    if isinstance(value, str):
        return value.strip()
    captions = tuple(c.strip() for c in (value or ()) if c is not None)
    if len(captions) == 1:
        return captions[0]
    if captions:
        return captions
    if fallback is None:
        raise ValueError(f"{where} has no caption")
    return fallback


def row_image(images, column, row):
    """The image of `row` (upright RGB): its stored bytes, or the local file it names, decoded by data.load_image."""
    value = images[row][column]
    if value is None:
        raise ValueError("the row has no image")
    if value.get("bytes") is not None:
        try:
            return load_image(io.BytesIO(value["bytes"]))
        except UnidentifiedImageError:           # its message names the BytesIO object, not the row
            raise ValueError("its stored bytes are not an image file PIL knows") from None
    if value.get("path") and os.path.isfile(value["path"]):
        return load_image(value["path"])
    raise ValueError(f"neither stored bytes nor a local file ({value.get('path')})")


def dataset_examples(cfg, resolution, fallback_caption=None, log=print, condition_column=None):
    """Every row of the dataset as an Example (module docstring), its image decoded once here; with
    `condition_column` (a ControlNet's data: train/control_data.py), each with that column's image as its
    conditioning image, decoded once here too."""
    check_resolution(resolution)
    datasets = import_datasets()
    data, label = load(cfg)
    columns = list(data.column_names)
    listed = ", ".join(columns)
    image_columns = [(cfg.image_column, "--image-column")]
    if condition_column is not None:
        image_columns.append((condition_column, "--conditioning-image-column"))
    for column, flag in image_columns:
        if column not in columns:
            raise ValueError(f"{label} has no column {column!r} ({flag}); its columns: {listed}")
        feature = data.features[column]
        if not isinstance(feature, datasets.Image):
            raise ValueError(f"column {column!r} of {label} holds {feature}, not images ({flag}); "
                             f"its columns: {listed}")
    caption_column = cfg.caption_column
    if caption_column is None:                   # textual inversion: "text" if there is one, else templates
        caption_column = "text" if "text" in columns else None
        if caption_column is None:
            log(f"{label} has no column 'text': template prompts for every image")
    elif caption_column not in columns:
        raise ValueError(f"{label} has no column {caption_column!r} (--caption-column); its columns: {listed}")
    if caption_column is not None:
        feature = data.features[caption_column]
        inner = getattr(feature, "feature", None)
        if not (is_string(feature, datasets) or (isinstance(feature, (datasets.List, datasets.LargeList))
                                                 and is_string(inner, datasets))):
            raise ValueError(f"column {caption_column!r} of {label} holds {feature}, not captions (strings or lists "
                             f"of strings; --caption-column)")
    if len(data) == 0:
        raise ValueError(f"{label} has no rows")

    # the image columns alone, their files undecoded ({"bytes", "path"}): decoded by load_image, as --data's
    # files; both are in-memory views of the same Arrow data, nothing is written (not even a cache file)
    images = data.select_columns([c for c, _ in image_columns])
    for column, _ in image_columns:
        images = images.cast_column(column, datasets.Image(decode=False))
    captions = data[caption_column] if caption_column else [None] * len(data)
    examples = []
    for i, value in enumerate(captions):
        where = f"{label} row {i}"
        loader = functools.partial(row_image, images, cfg.image_column, i)
        size = decoded(loader, where, "image").size
        example = Example(where, caption_of(value, fallback_caption, where), size=size, loader=loader)
        if condition_column is not None:
            condition = functools.partial(row_image, images, condition_column, i)
            decoded(condition, where, f"conditioning image (column {condition_column!r})")
            example = dataclasses.replace(example, condition=f"{where} {condition_column}", condition_loader=condition)
        examples.append(example)
    return examples


def decoded(loader, where, what):
    """loader()'s image, or a one-line error naming the row."""
    try:
        return loader()
    except Exception as e:                       # PIL raises OSError, SyntaxError, ValueError... for bad files
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{where} is not a readable {what} ({reason})") from None
