"""`--dataset-name` (minisd.train.hf_dataset): a Hugging Face dataset trains exactly what a folder of the same
images and captions trains, read from every kind of source (save_to_disk, parquet, imagefolder), without writing a
byte into it; bad datasets are one-line errors before training.

The datasets are built here from the images of one folder (offline; datasets' cache redirected to a temporary
folder). The comparison is bit for bit: the same images, captions, order, crops and flips give the same float
operations, so the trained weights (tiny built-in model, 32 px, 2 steps of 2 examples, random crops and flips) are
equal to the last bit; a change of one pixel, one caption or the order shows (test_the_comparison_can_fail).
"""
import dataclasses
import hashlib
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from minisd.cli import main
from minisd.train import finetune, lora, textual_inversion
from minisd.train.batches import Stream, take
from minisd.train.data import find_examples
from minisd.train.hf_dataset import INSTALL, dataset_examples
from minisd.train.step import example_generator

datasets = pytest.importorskip("datasets")

pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py: small tensors, one thread

CAPTIONS = ["a red circle on a blue square", " two green triangles \n", "a photo of a yellow star"]   # stripped
RUN = dict(resolution=32, max_train_steps=2, train_batch_size=2, random_flip=True, device="cpu")


def quiet(*_):
    pass


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    """load_dataset writes its Arrow files into datasets' cache: a temporary one here, not ~/.cache; datasets'
    progress bars off."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_cache")))
        datasets.disable_progress_bars()         # stderr holds the error line alone
        yield
        datasets.enable_progress_bars()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One folder of 3 random-pixel 40x32 images with metadata.jsonl captions (what --data reads, and an
    imagefolder): an RGB PNG, a greyscale PNG and a JPEG whose EXIF orientation turns it upright to 32x40; and the
    same files as a Dataset, written by save_to_disk (columns "picture", "caption") and to_parquet."""
    root = tmp_path_factory.mktemp("sources")
    folder = root / "folder"
    folder.mkdir()
    names = ["00.png", "01.png", "02.jpg"]
    files = []
    with open(folder / "metadata.jsonl", "w") as f:
        for i, (name, caption) in enumerate(zip(names, CAPTIONS)):
            a = np.random.default_rng([7, i]).integers(0, 256, (32, 40, 3), dtype=np.uint8)
            image = Image.fromarray(a).convert("L" if i == 1 else "RGB")
            exif = Image.Exif()
            exif[0x0112] = 6 if name.endswith(".jpg") else 1       # orientation: rotate 90 degrees to show
            image.save(folder / name, exif=exif)
            files.append((folder / name).read_bytes())
            f.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    data = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in files], "text": CAPTIONS},
                                      features=features)
    data.rename_columns({"image": "picture", "text": "caption"}).save_to_disk(str(root / "saved"))
    data.to_parquet(str(root / "data.parquet"))
    return {"folder": folder, "saved": root / "saved", "parquet": root / "data.parquet", "root": root}


def digest(path):
    """A hash of every file under `path` (a file or a folder): names, sizes and bytes."""
    h = hashlib.sha256()
    paths = [path] if os.path.isfile(path) else sorted(os.path.join(d, n) for d, _, ns in os.walk(path) for n in ns)
    for p in paths:
        h.update(os.path.relpath(p, path).encode())
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def assert_same_tensors(a, b):
    a, b = load_file(a), load_file(b)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"


@pytest.fixture(scope="module")
def folder_finetune(sources, tmp_path_factory):
    """The reference: fine-tuning on the folder."""
    out = tmp_path_factory.mktemp("folder_run")
    return finetune.run(finetune.FinetuneConfig(out=str(out), data=str(sources["folder"]), **RUN), log=quiet)


@pytest.mark.parametrize("kind, columns", [("saved", dict(image_column="picture", caption_column="caption")),
                                           ("parquet", {}), ("folder", {})])      # folder: as an imagefolder
def test_finetune_on_a_dataset_equals_the_folder_bit_for_bit(tmp_path, sources, folder_finetune, kind, columns):
    before = digest(sources[kind])
    cfg = finetune.FinetuneConfig(out=str(tmp_path / "out"), dataset_name=str(sources[kind]), **columns, **RUN)
    assert_same_tensors(finetune.run(cfg, log=quiet), folder_finetune)
    # the same captions too, stripped as a folder's are (CLIP's tokenizer would hide the difference in the weights)
    folder = find_examples(str(sources["folder"]), 32, log=quiet)
    assert [e.caption for e in dataset_examples(cfg, 32, log=quiet)] == [e.caption for e in folder]
    assert digest(sources[kind]) == before, "the dataset on disk must be read only"
    if kind == "saved":         # no cache file beside the Arrow files either
        assert sorted(os.listdir(sources["saved"])) == ["data-00000-of-00001.arrow", "dataset_info.json",
                                                        "state.json"]


def test_the_comparison_can_fail(tmp_path, sources, folder_finetune):
    """The same dataset with one caption changed trains other weights."""
    table = datasets.load_dataset("parquet", data_files=str(sources["parquet"]), split="train")
    changed = table.map(lambda row, i: {"text": row["text"] + ("!" if i == 2 else "")}, with_indices=True)
    changed.save_to_disk(str(tmp_path / "changed"))
    cfg = finetune.FinetuneConfig(out=str(tmp_path / "out"), dataset_name=str(tmp_path / "changed"), **RUN)
    with pytest.raises(AssertionError, match="tensors differ"):
        assert_same_tensors(finetune.run(cfg, log=quiet), folder_finetune)


def test_lora_on_a_dataset_equals_the_folder_bit_for_bit(tmp_path, sources):
    files = []
    for name, source in (("folder", dict(data=str(sources["folder"]))),
                         ("parquet", dict(dataset_name=str(sources["parquet"])))):
        cfg = lora.LoRAConfig(out=str(tmp_path / name), **source, **RUN)
        files.append(lora.run(cfg, log=quiet))
    assert_same_tensors(*files)


def test_textual_inversion_on_an_uncaptioned_dataset_uses_templates_as_the_folder_does(tmp_path, sources):
    """Without a caption column (and without --caption-column), every image gets the template prompts, as the
    images of a folder without captions do."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for image in sorted(sources["folder"].glob("0*")):                  # the images, without metadata.jsonl
        (bare / image.name).write_bytes(image.read_bytes())
    saved = datasets.load_from_disk(str(sources["saved"])).remove_columns(["caption"])
    saved.save_to_disk(str(tmp_path / "saved"))
    files = []
    for name, source in (("folder", dict(data=str(bare))),
                         ("saved", dict(dataset_name=str(tmp_path / "saved"), image_column="picture"))):
        cfg = textual_inversion.TextualInversionConfig(out=str(tmp_path / name), token="<shape>", init_token="shape",
                                                       **source, **RUN)
        files.append(textual_inversion.run(cfg, log=quiet))
    assert_same_tensors(*files)


def test_a_list_of_captions_is_drawn_per_use_from_the_example_generator(tmp_path, sources):
    """diffusers' train_text_to_image takes random.choice of a list of captions; here each use draws from the
    example's own (seed, step, place) generator: the same caption on a rerun or resume, different ones over
    steps. A list of one is that caption; captions are stripped as a folder's are."""
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": (sources["folder"] / "00.png").read_bytes(), "path": None}] * 2,
         "text": [[" first ", "second", "third"], ["only one "]]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.List(datasets.Value("string"))}))
    table.save_to_disk(str(tmp_path / "lists"))
    cfg = finetune.FinetuneConfig(out="", dataset_name=str(tmp_path / "lists"))
    examples = dataset_examples(cfg, 32, log=quiet)
    assert [e.caption for e in examples] == [("first", "second", "third"), "only one"]
    settings = finetune.FinetuneConfig(out="", train_batch_size=1, seed=3)
    stream = Stream(examples[:1], stream=0)
    drawn = [take(stream, k, settings, 32, [example_generator(3, k, 0)])[2][0] for k in range(12)]
    assert drawn == [take(stream, k, settings, 32, [example_generator(3, k, 0)])[2][0] for k in range(12)]
    assert set(drawn) == {"first", "second", "third"}


# --- bad input: one line each, before anything is written ----------------------------------------------------------

def bad_dataset(path):
    """Two rows, the second an image that does not decode."""
    good = (path.parent / "good.png")
    Image.new("RGB", (8, 8)).save(good)
    datasets.Dataset.from_dict(
        {"image": [{"bytes": good.read_bytes(), "path": None}, {"bytes": b"\x89PNG not really", "path": None}],
         "text": ["a", "b"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})).save_to_disk(
        str(path))
    return path


@pytest.mark.parametrize("flags, message", [
    (["--image-column", "picture"], "has no column 'picture' (--image-column); its columns: image, text"),
    (["--caption-column", "caption"], "has no column 'caption' (--caption-column); its columns: image, text"),
    (["--image-column", "text"], "column 'text' of {parquet}[train] holds Value('string'), not images"),
    (["--caption-column", "image"], "column 'image' of {parquet}[train] holds Image(mode=None, decode=True), "
                                    "not captions"),
    (["--dataset-split", "test"], 'Unknown split "test"'),
    (["--dataset-config-name", "x"], "--dataset-config-name applies to Hub datasets, not to {parquet}"),
    (["--data", "{folder}"], "--data and --dataset-name are different sources of images; give one"),
])
def test_bad_datasets_are_one_line_errors(tmp_path, capsys, sources, flags, message):
    names = {k: str(v) for k, v in sources.items()}
    out = tmp_path / "out"
    flags = [f.format(**names) for f in flags]
    assert main(["train", "finetune", "--dataset-name", names["parquet"], "--out", str(out), "--device", "cpu",
                 *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.format(**names) in err[0], err
    assert not out.exists()


def test_an_image_that_does_not_decode_is_named_by_its_row(tmp_path, capsys):
    path = bad_dataset(tmp_path / "bad")
    assert main(["train", "lora", "--dataset-name", str(path), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"minisd: error: {path} row 1 is not a readable image (its stored bytes are not an image file "
                   f"PIL knows)"], err


def test_a_saved_dataset_dict_has_its_splits_named(tmp_path, sources):
    table = datasets.load_from_disk(str(sources["saved"]))
    datasets.DatasetDict({"validation": table}).save_to_disk(str(tmp_path / "dict"))
    cfg = finetune.FinetuneConfig(out="", dataset_name=str(tmp_path / "dict"), image_column="picture",
                                  caption_column="caption")
    with pytest.raises(ValueError, match=r"has no split 'train' \(--dataset-split\); its splits: validation$"):
        dataset_examples(cfg, 32, log=quiet)
    assert len(dataset_examples(dataclasses.replace(cfg, dataset_split="validation"), 32, log=quiet)) == 3
    # a saved Dataset of one named split is that split
    datasets.Dataset.from_dict(table.to_dict(), features=table.features, split="test").save_to_disk(
        str(tmp_path / "test"))
    cfg = dataclasses.replace(cfg, dataset_name=str(tmp_path / "test"))
    with pytest.raises(ValueError, match=r"holds the split 'test' only, not 'train'; pass --dataset-split test$"):
        dataset_examples(cfg, 32, log=quiet)
    assert len(dataset_examples(dataclasses.replace(cfg, dataset_split="test"), 32, log=quiet)) == 3


def test_without_the_datasets_package_the_error_says_how_to_install_it(tmp_path, capsys, monkeypatch, sources):
    monkeypatch.setitem(sys.modules, "datasets", None)          # `import datasets` raises ImportError
    assert main(["train", "textual-inversion", "--dataset-name", str(sources["parquet"]),
                 "--token", "<w>", "--init-token", "shape", "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == f"minisd: error: {INSTALL}"
    assert 'pip install -e ".[datasets]"' in INSTALL


def test_minisd_imports_datasets_only_for_dataset_name():
    import subprocess
    code = "import sys, minisd.cli, minisd.train.finetune; sys.exit('datasets' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__))).returncode == 0


def test_a_dataset_trains_in_aspect_ratio_buckets_as_the_folder_does(tmp_path, sources):
    """--enable-bucket on dataset rows: each row's size is known from its decoded image (Example.size), so the
    40x32 and the upright 32x40 images land in the buckets their files land in, with the same weights; buckets.json
    names the rows."""
    buckets = dict(enable_bucket=True, min_bucket_reso=16, max_bucket_reso=64, bucket_reso_steps=8,
                   bucket_no_upscale=True)            # each image its own bucket: 40x32 -> 32x24, 32x40 -> 24x32
    runs = {}
    for kind, source in (("data", dict(data=str(sources["folder"]))),
                         ("dataset_name", dict(dataset_name=str(sources["parquet"])))):
        out = tmp_path / kind
        runs[kind] = finetune.run(finetune.FinetuneConfig(out=str(out), **source, **buckets, **RUN), log=quiet)
        runs[kind + "_json"] = json.loads((out / "buckets.json").read_text())["data"]
    assert_same_tensors(runs["data"], runs["dataset_name"])
    by_file, by_row = runs["data_json"], runs["dataset_name_json"]
    assert sorted(by_file) == ["00.png", "01.png", "02.jpg"] and len(by_row) == 3
    assert [by_file[n] for n in sorted(by_file)] == list(by_row.values())
    assert by_file["00.png"] == [32, 24] and by_file["02.jpg"] == [24, 32]
    assert all(name.endswith(f"row {i}") for i, name in enumerate(by_row))
