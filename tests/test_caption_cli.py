"""`minisd caption DIR` on a small random BLIP saved as transformers saves it (tests/_blip_refs.py): the captions
it writes are transformers' (generate + BlipProcessor.decode), beside each picture or in metadata.jsonl, with the
prefix; captioned pictures are skipped unless --overwrite; the pictures are never modified; bad input is one
line; `--model blip-base` is fetched (checked, cached) from a hub imitation on 127.0.0.1 (tests/test_download.py)."""
import hashlib
import json
import shutil

import pytest
import torch

from _blip_refs import pictures, reference_blip, save_folder
from minisd import cli
from minisd import download as dl
from minisd.caption import blip
from minisd.train.data import read_metadata
from test_download import Hub

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL_VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    image_size=64, patch_size=16)
SMALL_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
ARGS = ["--min-length", "3", "--max-length", "16", "--device", "cpu"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(folder, reference captions(images, prompt, beams))."""
    folder = tmp_path_factory.mktemp("small-blip")
    ref = reference_blip(vision=SMALL_VISION, text=SMALL_TEXT, seed=2, sep_bias=1.0)
    with torch.no_grad():
        for layer in ref.text_decoder.bert.encoder.layer:
            layer.crossattention.output.dense.weight.mul_(25)
    save_folder(ref, folder)
    from transformers import BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    processor = BlipProcessor.from_pretrained(str(folder))
    processor.image_processor = BlipImageProcessorPil.from_pretrained(str(folder))

    def captions(images, prompt=None, beams=1):
        kw = {}
        if prompt:
            kw["input_ids"] = processor(text=[prompt] * len(images), return_tensors="pt").input_ids
        pixels = processor(images=images, return_tensors="pt").pixel_values
        ids = ref.generate(pixel_values=pixels, num_beams=beams, min_length=3, max_length=16, **kw)
        return processor.batch_decode(ids, skip_special_tokens=True)
    return folder, captions


@pytest.fixture
def photos(tmp_path):
    """Five pictures, PNG and JPEG, one in a kohya-style subfolder; returns (folder, {relative path: image})."""
    root = tmp_path / "photos"
    (root / "10_sks dog").mkdir(parents=True)
    files = {}
    for i, image in enumerate(pictures(5, seed=1)):
        rel = f"10_sks dog/img{i}.png" if i == 4 else f"img{i}.{'png' if i % 2 else 'jpg'}"
        image.save(root / rel, quality=95)
        files[rel] = image
    return root, files


def digests(root):
    return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in (".png", ".jpg")}


def caption(capsys, *argv):
    status = cli.main(["caption", *map(str, argv)])
    out = capsys.readouterr()
    return status, out.out, out.err


def expected_for(root, files, captions, prompt=None, beams=1):
    from minisd.train.data import load_image
    rels = list(files)
    texts = captions([load_image(root / r) for r in rels], prompt, beams)
    return dict(zip(rels, texts))


def test_writes_transformers_captions_beside_each_image_with_prefix(model, photos, capsys):
    folder, captions = model
    root, files = photos
    before = digests(root)
    status, out, err = caption(capsys, root, "--model", folder, *ARGS, "--num-beams", "3", "--prompt", "a photo of",
                               "--prefix", "sks dog,", "--batch-size", "2")
    assert status == 0, err
    assert out.strip().splitlines()[-1] == "captioned 5, skipped 0"
    expected = expected_for(root, files, captions, "a photo of", 3)
    for rel, text in expected.items():
        assert (root / rel).with_suffix(".txt").read_text(encoding="utf-8") == f"sks dog, {text}\n"
    assert len(set(expected.values())) > 1                     # the pictures got different captions
    assert digests(root) == before                             # images untouched
    assert not [p for p in root.rglob("*") if p.name.startswith(".")]   # no temporary files left


def test_skips_captioned_images_unless_overwrite(model, photos, capsys):
    folder, captions = model
    root, files = photos
    (root / "img1.txt").write_text("my own caption\n", encoding="utf-8")
    status, out, _ = caption(capsys, root, "--model", folder, *ARGS)
    assert status == 0 and out.strip().endswith("captioned 4, skipped 1")
    assert (root / "img1.txt").read_text(encoding="utf-8") == "my own caption\n"
    status, out, _ = caption(capsys, root, "--model", folder, *ARGS)
    assert out.strip().endswith("captioned 0, skipped 5")
    before = digests(root)
    status, out, _ = caption(capsys, root, "--model", folder, *ARGS, "--overwrite")
    assert out.strip().endswith("captioned 5, skipped 0")
    greedy = expected_for(root, files, captions)
    assert (root / "img1.txt").read_text(encoding="utf-8") == greedy["img1.png"] + "\n"
    assert digests(root) == before


def test_caption_extension(model, photos, capsys):
    folder, _ = model
    root, files = photos
    status, out, _ = caption(capsys, root, "--model", folder, *ARGS, "--caption-extension", ".caption")
    assert status == 0
    assert sorted(p.name for p in root.rglob("*.caption")) == sorted(f"img{i}.caption" for i in range(5))
    assert not list(root.rglob("*.txt"))


def test_metadata_jsonl_per_folder_keeps_other_rows(model, photos, capsys):
    folder, captions = model
    root, files = photos
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "img0.jpg", "text": "kept"}) + "\n")
    status, out, _ = caption(capsys, root, "--model", folder, *ARGS, "--metadata")
    assert status == 0 and out.strip().endswith("captioned 4, skipped 1")
    expected = expected_for(root, files, captions)
    top = read_metadata(root)                                  # what `minisd train` reads
    assert top == {"img0.jpg": "kept", **{r: expected[r] for r in files if "/" not in r and r != "img0.jpg"}}
    assert read_metadata(root / "10_sks dog") == {"img4.png": expected["10_sks dog/img4.png"]}
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    assert all(set(row) == {"file_name", "text"} for row in rows) and rows[0]["file_name"] == "img0.jpg"
    assert not list(root.rglob("*.txt"))
    status, out, _ = caption(capsys, root, "--model", folder, *ARGS, "--metadata", "--overwrite")
    assert out.strip().endswith("captioned 5, skipped 0") and read_metadata(root)["img0.jpg"] == expected["img0.jpg"]


def test_bad_input_is_one_line(model, photos, capsys, tmp_path):
    folder, _ = model
    root, _ = photos
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [((empty, "--model", folder), "no images"),
             ((tmp_path / "missing", "--model", folder), "does not exist"),
             ((root, "--model", "no-such-model"), "unknown model 'no-such-model'"),
             ((root, "--model", tmp_path), "not a transformers model folder"),
             ((root, "--model", folder, "--caption-extension", "txt"), "must start with a dot"),
             ((root, "--model", folder, "--caption-extension", ".png"), "would overwrite images"),
             ((root, "--model", folder, "--num-beams", "0"), "--num-beams")]
    for argv, message in cases:
        status, out, err = caption(capsys, *argv)
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    for model in (folder, "no-such-model"):      # the model name is checked first, then every image
        status, out, err = caption(capsys, root, "--model", model)
        message = "broken.jpg is not a readable image" if model == folder else "unknown model"
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not list(root.rglob("*.txt"))                       # nothing was written before the error


def test_tiny_and_blip2_and_other_model_types(model, photos, capsys, tmp_path, monkeypatch):
    folder, _ = model
    root, _ = photos
    monkeypatch.setattr("minisd.caption.TINY", tmp_path / "no-tiny")
    status, _, err = caption(capsys, root, "--model", "tiny")
    assert status == 2 and "tiny captioner is not installed" in err
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    status, _, err = caption(capsys, root, "--model", other)
    assert status == 2 and "model_type 'bert'" in err
    try:
        import minisd.caption.blip2  # noqa: F401
    except ImportError:
        (other / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
        status, _, err = caption(capsys, root, "--model", other)
        assert status == 2 and "BLIP-2" in err


def test_named_model_is_fetched_checked_and_cached(model, photos, capsys, tmp_path, monkeypatch):
    folder, captions = model
    root, files = photos
    repo = dl.FOLDERS["blip-base"].repo
    served = {f"/{repo}/resolve/main/{p.name}": p.read_bytes() for p in folder.iterdir()}
    # small files carry git's blob id as their checksum on the hub, LFS files (the weights) their SHA-256
    etags = {k: hashlib.sha256(v).hexdigest() if k.endswith(".safetensors") else
             hashlib.sha1(f"blob {len(v)}\0".encode() + v).hexdigest() for k, v in served.items()}
    for optional in ("special_tokens_map.json",):                  # save_pretrained does not write it: a 404
        assert f"/{repo}/resolve/main/{optional}" not in served
        served[f"/{repo}/resolve/main/{optional}"] = b"{}"
        etags[f"/{repo}/resolve/main/{optional}"] = hashlib.sha1(b"blob 2\0{}").hexdigest()
    monkeypatch.setenv("MINISD_CACHE", str(tmp_path / "cache"))
    with Hub(served, etags) as hub:
        monkeypatch.setenv("MINISD_HF_ENDPOINT", hub.url)
        status, out, err = caption(capsys, root, "--model", "blip-base", *ARGS)
        assert status == 0, err
        fetched = len(hub.requests)
        status, out, err = caption(capsys, root, "--model", "blip-base", *ARGS, "--overwrite")
        assert status == 0 and len(hub.requests) == fetched         # the second run reads the cache
    cached = dl.folder_path("blip-base")
    assert (cached / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    expected = expected_for(root, files, captions)
    assert (root / "img2.txt").read_text(encoding="utf-8") == expected["img2.jpg"] + "\n"

    # a corrupted small file is refused and not kept
    shutil.rmtree(cached)
    bad = dict(etags)
    bad[f"/{repo}/resolve/main/config.json"] = "0" * 40
    with Hub(served, bad) as hub:
        monkeypatch.setenv("MINISD_HF_ENDPOINT", hub.url)
        status, _, err = caption(capsys, root, "--model", "blip-base", *ARGS, "--overwrite")
    assert status == 2 and "Checksum mismatch" in err and "config.json" in err
    assert not (cached / "config.json").exists()


def test_sharded_folder_is_fetched_with_its_shards(model, tmp_path, monkeypatch):
    folder, _ = model
    ref = blip.load_blip(folder)
    sharded = tmp_path / "sharded"
    from transformers import BlipForConditionalGeneration
    BlipForConditionalGeneration.from_pretrained(str(folder)).save_pretrained(str(sharded), max_shard_size="200KB")
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    for name in ("preprocessor_config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, sharded / name)
    spec = dl.NamedFolder("org/sharded-blip", ("config.json", "preprocessor_config.json", "vocab.txt"),
                          weights="model.safetensors.index.json", optional=("tokenizer.json", "tokenizer_config.json",
                                                                           "added_tokens.json"))
    monkeypatch.setitem(dl.FOLDERS, "sharded-blip", spec)
    served = {f"/org/sharded-blip/resolve/main/{p.name}": p.read_bytes() for p in sharded.iterdir()}
    with Hub(served) as hub:
        got = dl.fetch_folder("sharded-blip", cache=tmp_path / "cache", endpoint=hub.url, progress=False)
    assert sorted(p.name for p in got.glob("model-*.safetensors")) == shards
    assert not (got / "added_tokens.json").exists()                  # optional, not on the hub: skipped
    loaded = blip.load_blip(got)
    assert all(torch.equal(a, b) for a, b in zip(ref.model.state_dict().values(),
                                                 loaded.model.state_dict().values()))
