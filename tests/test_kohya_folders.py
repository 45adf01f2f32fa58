"""kohya-ss/sd-scripts' folders and caption tricks: `N_prompt` subfolders (repeats, captions from folder names),
--caption-extension, --reg-data-dir, the bad-input errors, --caption-dropout-rate / --shuffle-caption /
--keep-tokens / --caption-tag-dropout-rate as pure functions of (seed, step, example), and a run with all of it
and buckets that resumes bit for bit and leaves the user's folders as they were. (Several processes with them:
tests/test_distributed.py.)"""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from _kohya_buckets import BucketManager
from minisd.cli import main
from minisd.train import captions, dreambooth, finetune
from minisd.train.batches import Stream, micro_batch, take
from minisd.train.data import find_examples
from minisd.train.step import example_generator
from weights_convert import detect

pytestmark = pytest.mark.usefixtures("one_thread")


def quiet(*_):
    pass


def image(path, w=24, h=16, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def kohya_folder(root):
    """10_sks dog (2 images, one captioned), 1_a cat (1 image, uncaptioned), a hidden folder and a stray file."""
    image(root / "10_sks dog" / "a.png", seed=1)
    image(root / "10_sks dog" / "b.jpg", seed=2)
    (root / "10_sks dog" / "a.txt").write_text("sks dog, on grass, sunny")
    image(root / "1_a cat" / "c.png", 16, 24, seed=3)
    image(root / ".ipynb_checkpoints" / "x.png")
    (root / "README.md").write_text("my photos")
    return root


def test_repeats_and_captions_come_from_n_prompt_folders(tmp_path):
    notes = []
    examples = find_examples(kohya_folder(tmp_path), 64, log=notes.append)
    got = [(os.path.relpath(e.path, tmp_path), e.caption, e.repeats, e.size) for e in examples]
    assert got == [("10_sks dog/a.png", "sks dog, on grass, sunny", 10, (24, 16)),
                   ("10_sks dog/b.jpg", "sks dog", 10, (24, 16)), ("1_a cat/c.png", "a cat", 1, (16, 24))]
    assert notes == [f"skipped 2 entries in {tmp_path} that are not N_prompt subfolders (first: .ipynb_checkpoints)"]
    # the folder's prompt wins over the caller's (DreamBooth's --instance-prompt); "N" alone has no prompt
    image(tmp_path / "2" / "d.png")
    examples = find_examples(tmp_path, 64, fallback_caption="a photo of sks", log=quiet)
    assert [e.caption for e in examples] == ["sks dog, on grass, sunny", "sks dog", "a cat", "a photo of sks"]


def test_an_epoch_holds_each_image_its_repeats(tmp_path):
    image(tmp_path / "3_x" / "a.png")
    image(tmp_path / "1_y" / "b.png")
    image(tmp_path / "2_z" / "c.png")
    examples = find_examples(tmp_path, 64, log=quiet)
    assert [e.repeats for e in examples] == [1, 2, 3]            # 1_y, 2_z, 3_x in sorted order
    s = Stream(examples, 0)
    epoch = [i for k in range(3) for i in micro_batch(s, 2, k, seed=4)]   # 6 entries: one epoch
    assert sorted(epoch) == [0, 1, 1, 2, 2, 2]
    second = [i for k in range(3, 6) for i in micro_batch(s, 2, k, seed=4)]
    assert sorted(second) == sorted(epoch) and second != epoch              # a fresh order
    # without repeats the batches are today's (a plain folder reads as before)
    plain = [dataclasses.replace(e, repeats=1) for e in examples]
    from minisd.train.batches import batch_indices
    assert [micro_batch(Stream(plain, 0), 2, k, 4) for k in range(5)] == [batch_indices(3, 2, k, 4) for k in range(5)]


def test_caption_extension(tmp_path):
    image(tmp_path / "a.png")
    image(tmp_path / "b.png")
    (tmp_path / "a.caption").write_text("from .caption")
    (tmp_path / "a.txt").write_text("from .txt")
    (tmp_path / "b.txt").write_text("b from .txt")
    notes = []
    examples = find_examples(tmp_path, 64, "fallback", log=notes.append, caption_extension=".caption")
    assert [e.caption for e in examples] == ["from .caption", "fallback"]
    assert notes == [f"skipped 2 entries in {tmp_path} that are not images or captions (first: a.txt)"]
    assert [e.caption for e in find_examples(tmp_path, 64, log=quiet)] == ["from .txt", "b from .txt"]
    for bad in ("caption", ".", ".png", ""):
        with pytest.raises(ValueError, match="--caption-extension must be a file extension"):
            find_examples(tmp_path, 64, log=quiet, caption_extension=bad)


@pytest.mark.parametrize("make,message", [
    (lambda p: image(p / "0_dog" / "a.png"), r"0_dog: the subfolders of kohya's layout are named N_prompt with N a "
                                             r"positive integer \(the repeats\), got '0_dog'$"),
    (lambda p: image(p / "x_dog" / "a.png"), r"got 'x_dog'$"),
    (lambda p: image(p / "-3_dog" / "a.png"), r"got '-3_dog'$"),
    (lambda p: image(p / "photos" / "a.png"), r"got 'photos'$"),
    (lambda p: (p / "5_dog").mkdir(), r"^no images \(png, jpg, jpeg, webp, bmp\) in \S*5_dog$"),
    (lambda p: (p / "notes.md").write_text("x"), r"^no images .* and no N_prompt subfolders \(kohya's layout\) in "),
    (lambda p: None, r"^\S* is empty$"),
    (lambda p: (image(p / "a.png"), image(p / "3_dog" / "b.png")), r"holds both images and kohya's N_prompt "
                                                                   r"subfolders \(3_dog\)"),
    (lambda p: (image(p / "a.png"), (p / "a.txt").write_bytes(b"caf\xe9 latte")),
     r"a.txt is not UTF-8 text \(byte 3: invalid continuation byte\); save it as UTF-8$"),
    (lambda p: (image(p / "a.png"), (p / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "\xff"}')),
     r"metadata.jsonl is not UTF-8 text"),
])
def test_bad_folders_are_one_line_errors(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(ValueError, match=message) as e:
        find_examples(tmp_path, 64, "p", log=quiet)
    assert "\n" not in str(e.value)


def test_an_image_that_cannot_be_decoded_is_an_error_or_with_skip_bad_images_a_counted_note(tmp_path):
    image(tmp_path / "2_dog" / "good.png")
    (tmp_path / "2_dog" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    (tmp_path / "2_dog" / "cut.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(ValueError, match=r"2_dog/bad.png is not a readable image \(.*\); --skip-bad-images"):
        find_examples(tmp_path, 64, log=quiet)
    notes = []
    examples = find_examples(tmp_path, 64, log=notes.append, skip_bad_images=True)
    assert [os.path.basename(e.path) for e in examples] == ["good.png"]
    assert len(notes) == 1 and notes[0].startswith("skipped 2 images that cannot be decoded (--skip-bad-images; "
                                                   f"first: {tmp_path / '2_dog' / 'bad.png'}: ")
    (tmp_path / "2_dog" / "good.png").unlink()
    with pytest.raises(ValueError, match="no readable images in .*: all 2 cannot be decoded"):
        find_examples(tmp_path, 64, log=quiet, skip_bad_images=True)


def test_the_command_line_prints_one_line_before_training(tmp_path, capsys):
    image(tmp_path / "data" / "0_dog" / "a.png")
    assert main(["train", "finetune", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minisd: error: ") and "got '0_dog'" in err[0], err
    assert not (tmp_path / "out" / "checkpoints").exists()
    for flags, message in [(["--caption-dropout-rate", "1.5"], "--caption-dropout-rate must be in [0, 1]"),
                           (["--keep-tokens", "-1"], "--keep-tokens must be >= 0"),
                           (["--enable-bucket", "--resolution", "64", "--bucket-reso-steps", "20"], "multiple of 8"),
                           (["--caption-extension", "txt"], "--caption-extension must be")]:
        assert main(["train", "lora", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
                     "--device", "cpu", *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_reg_data_dir_gives_prior_preservation_with_kohyas_class_folders_and_generates_nothing(tmp_path):
    kohya_folder(tmp_path / "inst")
    image(tmp_path / "reg" / "1_dog" / "r0.png", seed=7)
    image(tmp_path / "reg" / "1_dog" / "r1.png", seed=8)
    cfg = dreambooth.DreamBoothConfig(out=str(tmp_path / "out"), instance_dir=str(tmp_path / "inst"),
                                      reg_data_dir=str(tmp_path / "reg"))
    dreambooth.check_instances(cfg)               # no --instance-prompt needed in kohya's layout
    inst, cls = dreambooth.instance_streams(cfg, None, 64, "cpu", log=quiet)
    assert (inst.role, cls.role, cls.stream) == ("instance", "class", 1)
    assert [e.caption for e in cls.examples] == ["dog", "dog"] and len(os.listdir(tmp_path / "reg" / "1_dog")) == 2
    for change, message in [(dict(class_dir=str(tmp_path / "c")), "--reg-data-dir .* give one"),
                            (dict(instance_dir=str(tmp_path / "reg" / "1_dog"), reg_data_dir=None),
                             "needs --instance-prompt")]:
        with pytest.raises(ValueError, match=message):
            dreambooth.check_instances(dataclasses.replace(cfg, **change))


# ---------------------------------------------------------------------------------------------------------------
# caption tricks

TAGS = "sks, dog, grass, sunny, ball, park"
TRICKS = finetune.FinetuneConfig(out="x", shuffle_caption=True, keep_tokens=2, caption_tag_dropout_rate=0.25,
                                 caption_dropout_rate=0.1)


def trick(cfg, seed, k, j, caption=TAGS):
    return captions.apply(caption, cfg, captions.caption_generator(example_generator(seed, k, j)))


def test_caption_tricks_are_a_pure_function_of_seed_step_and_example_and_leave_its_generator_alone():
    a = [trick(TRICKS, 0, k, j) for k in range(20) for j in range(3)]
    assert a == [trick(TRICKS, 0, k, j) for k in range(20) for j in range(3)]
    assert a != [trick(TRICKS, 1, k, j) for k in range(20) for j in range(3)]
    assert len(set(a)) > 20                                  # the step and the place both change the draw
    g = example_generator(0, 3, 1)
    assert captions.apply(TAGS, TRICKS, captions.caption_generator(g)) == trick(TRICKS, 0, 3, 1)
    assert torch.equal(g.get_state(), example_generator(0, 3, 1).get_state())   # crops and noise are untouched


def test_keep_tokens_keep_the_first_tags_and_shuffle_permutes_the_rest():
    shuffle = dataclasses.replace(TRICKS, caption_tag_dropout_rate=0.0, caption_dropout_rate=0.0)
    seen = set()
    for k in range(200):
        tags = trick(shuffle, 0, k, 0).split(", ")
        assert tags[:2] == ["sks", "dog"] and sorted(tags[2:]) == sorted(["grass", "sunny", "ball", "park"])
        seen.add(tuple(tags[2:]))
    assert len(seen) == 24                                   # every order of the 4 free tags comes up
    assert trick(dataclasses.replace(shuffle, keep_tokens=5), 0, 0, 0, " a,b ,, c,") == "a, b, c"   # kohya's join
    assert trick(finetune.FinetuneConfig(out="x"), 0, 0, 0, " a,b ,, c,") == " a,b ,, c,"     # no trick: as is


def test_dropout_rates_drop_what_they_say():
    """4000 draws: the share of empty captions and of dropped free tags within 5 binomial sigmas of the rate; the
    kept tags are never dropped."""
    n = 4000
    out = [trick(TRICKS, 7, k, j) for k in range(n // 4) for j in range(4)]
    empty = sum(c == "" for c in out) / n
    assert abs(empty - 0.1) < 5 * (0.1 * 0.9 / n) ** 0.5
    kept = [c.split(", ") for c in out if c]
    assert all(tags[:2] == ["sks", "dog"] for tags in kept)
    dropped = 1 - sum(len(tags) - 2 for tags in kept) / (4 * len(kept))
    assert abs(dropped - 0.25) < 5 * (0.25 * 0.75 / (4 * len(kept))) ** 0.5
    assert all(trick(dataclasses.replace(TRICKS, caption_dropout_rate=1.0), 0, k, 0) == "" for k in range(20))


def test_take_needs_generators_for_caption_tricks(tmp_path):
    image(tmp_path / "a.png")
    s = Stream(find_examples(tmp_path, 16, "a, b, c", log=quiet), 0)
    cfg = dataclasses.replace(TRICKS, center_crop=True, train_batch_size=1)
    with pytest.raises(ValueError, match="caption tricks, need a generator per example"):
        take(s, 0, cfg, 16)
    assert take(s, 0, cfg, 16, [example_generator(0, 0, 0)])[2] == [trick(cfg, 0, 0, 0, "a, b, c")]


# ---------------------------------------------------------------------------------------------------------------
# a run with all of it

def snapshot(root):
    return {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in map(str, root.rglob("*")) if os.path.isfile(p)}


def test_kohya_folders_buckets_and_caption_tricks_resume_bit_identical_and_leave_the_folders_alone(tmp_path,
                                                                                                   monkeypatch):
    """finetune on kohya's layout with buckets, random crops and flips, and every caption trick: stopped after
    3 of 6 steps and resumed, it ends with the weights of a straight run, bit for bit; buckets.json names each
    image's bucket; nothing in the data folder changed."""
    from minisd.train import fit
    data = tmp_path / "data"
    sizes = [(48, 32), (32, 48), (40, 40), (50, 30)]
    for i, (w, h) in enumerate(sizes):
        image(data / f"{1 + i % 2}_thing, red, small" / f"{i}.png", w, h, seed=i)
    (data / "1_thing, red, small" / "0.txt").write_text("a circle, blue, big, on grass")
    before = snapshot(data)

    def args(out, *extra):
        return ["train", "finetune", "--data", str(data), "--out", str(out), "--resolution", "32", "--device", "cpu",
                "--enable-bucket", "--min-bucket-reso", "16", "--max-bucket-reso", "64", "--bucket-reso-steps", "8",
                "--max-train-steps", "6", "--train-batch-size", "2", "--checkpointing-steps", "3",
                "--learning-rate", "1e-4", "--random-flip", "--shuffle-caption", "--keep-tokens", "1",
                "--caption-tag-dropout-rate", "0.3", "--caption-dropout-rate", "0.2", *extra]
    texts = []
    real = fit.step_loss
    monkeypatch.setattr(fit, "step_loss", lambda *a, **kw: (texts.append(a[3].clone()), real(*a, **kw))[1])
    assert main(args(tmp_path / "straight")) == 0
    straight_texts, texts[:] = list(texts), []

    class Stop(Exception):
        pass

    def stop_after_3(self, step, loss, lr):
        if step == 3:                          # the 4th step: the checkpoint of step 3 is on disk
            raise Stop
    with monkeypatch.context() as m:
        m.setattr(fit.Progress, "__call__", stop_after_3)
        with pytest.raises(Stop):
            main(args(tmp_path / "stopped"))
    texts[:] = []
    assert main(args(tmp_path / "stopped", "--resume")) == 0
    assert all(torch.equal(a, b) for a, b in zip(texts, straight_texts[3:])) and len(texts) == 3   # same captions
    a = detect.read(str(tmp_path / "straight" / "model.safetensors"), verbose=False).state
    b = detect.read(str(tmp_path / "stopped" / "model.safetensors"), verbose=False).state
    assert all(torch.equal(a[k], b[k]) for k in a)
    start = detect.read(str(fit.locate(None, quiet)[0]), verbose=False).state
    assert not torch.equal(a["unet.out.2.weight"], start["unet.out.2.weight"].float())
    kohya = BucketManager(False, (32, 32), 16, 64, 8)
    kohya.make_buckets()
    expected = {f"{1 + i % 2}_thing, red, small/{i}.png": list(kohya.select_bucket(*size)[0])
                for i, size in enumerate(sizes)}
    assert json.loads((tmp_path / "straight" / "buckets.json").read_text()) == {"data": expected}
    assert len({tuple(b) for b in expected.values()}) == 3
    assert snapshot(data) == before
