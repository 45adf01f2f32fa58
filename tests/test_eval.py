"""`minisd eval`: images fixed by (prompt index, seed), reruns that skip what is on disk, metrics.json and the
name=value lines. Everything runs on the tiny built-in model with 2-4 sampling steps."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from test_pipeline import random_lora

from minisd import cli
from minisd.eval import image_plan, read_prompts
from minisd.tiny import shapes

PROMPTS = [shapes.caption("red", "circle", "blue"), shapes.caption("white", "square", "green"),
           shapes.caption("black", "triangle", "yellow")]


pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py: small tensors, one thread


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def test_image_k_is_prompt_k_mod_p_with_seed_plus_k():
    plan = image_plan(num_prompts=3, num_images=5, seed=100)
    assert [(k, p, s) for k, p, s, _ in plan] == [(0, 0, 100), (1, 1, 101), (2, 2, 102), (3, 0, 103), (4, 1, 104)]
    assert plan[3][3] == "p00000-s103.png"


def test_prompts_read_from_txt_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle on a blue background\n\n  a cat \n")
    assert read_prompts(tmp_path / "p.txt") == ["a red circle on a blue background", "a cat"]
    shapes.write_image_folder(tmp_path / "data", 2, seed=3)
    assert read_prompts(tmp_path / "data" / "metadata.jsonl") == [shapes.sample(3, i).text for i in range(2)]


def eval_args(tmp_path, *extra):
    return ["eval", "--prompts", str(tmp_path / "prompts.txt"), "--num-images", "4", "--out", str(tmp_path / "run"),
            "--steps", "2", "--batch-size", "3", "--features", "tiny", "--ref", str(tmp_path / "real"),
            "--metrics", "fid,adherence", *extra]


@pytest.fixture
def folders(tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    shapes.write_image_folder(tmp_path / "real", 8, seed=1)
    return tmp_path


def test_eval_writes_images_metrics_json_and_name_value_lines_last(folders, capsys):
    assert cli.main(eval_args(folders)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("=")[0] for line in lines[-2:]] == ["fid", "adherence"]
    metrics = json.loads((folders / "run" / "metrics.json").read_text())
    assert float(lines[-2].split("=")[1]) == pytest.approx(metrics["fid"], abs=1e-6)
    assert metrics["num_images"] == 4 and metrics["features"] == "tiny"
    assert sorted(p.name for p in (folders / "run" / "images").iterdir()) == [
        "p00000-s0.png", "p00000-s3.png", "p00001-s1.png", "p00002-s2.png"]


def test_a_rerun_generates_only_the_missing_images_and_they_are_the_same(folders, capsys):
    assert cli.main(eval_args(folders)) == 0
    images = folders / "run" / "images"
    kept, removed = images / "p00000-s0.png", images / "p00001-s1.png"
    before = pixels(Image.open(removed))
    kept_mtime = kept.stat().st_mtime_ns
    removed.unlink()
    capsys.readouterr()
    assert cli.main(eval_args(folders)) == 0
    assert "generating the other 1" in capsys.readouterr().out
    assert kept.stat().st_mtime_ns == kept_mtime                      # not written again
    # batch of 1 now, of 3 before: the same image up to the rounding of a batched U-Net call
    assert np.abs(pixels(Image.open(removed)) - before).max() <= 1


def test_a_rerun_with_other_generation_settings_is_refused(folders, capsys):
    assert cli.main(eval_args(folders)) == 0
    capsys.readouterr()
    args = eval_args(folders)
    args[args.index("--steps") + 1] = "3"
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "steps" in err and len(err.strip().splitlines()) == 1


def test_lora_flag_is_applied_and_is_part_of_the_settings(folders, capsys):
    assert cli.main(eval_args(folders)) == 0
    first = pixels(Image.open(folders / "run" / "images" / "p00000-s0.png"))
    path = random_lora(folders / "odd.safetensors")
    args = eval_args(folders, "--lora", f"{path}:0.8")
    assert cli.main(args) == 2                                        # the images there were made without it
    assert "lora" in capsys.readouterr().err
    args[args.index("--out") + 1] = str(folders / "with-lora")
    assert cli.main(args) == 0
    assert np.abs(pixels(Image.open(folders / "with-lora" / "images" / "p00000-s0.png")) - first).max() > 10


@pytest.mark.parametrize("change, message", [
    (("--metrics", "fid,psnr"), "unknown metric 'psnr'"),
    (("--ref", "shapes", "--features", "inception"), "--ref shapes"),
])
def test_errors_are_one_line(folders, capsys, change, message):
    args = eval_args(folders)
    for flag, value in zip(change[::2], change[1::2]):
        args[args.index(flag) + 1] = value
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_fid_needs_a_reference(folders, capsys):
    args = eval_args(folders)
    i = args.index("--ref")
    del args[i:i + 2]
    assert cli.main(args) == 2
    assert "needs --ref" in capsys.readouterr().err


def test_inception_score_is_computed_from_the_files_in_plan_order(folders):
    # a random Inception (no real weights offline): this checks the plumbing, not the numbers' meaning
    from safetensors.torch import save_file

    from minisd.metrics import fid as fid_mod
    from minisd.metrics.inception import InceptionV3
    from minisd.metrics.inception_score import inception_logits, inception_score
    torch.manual_seed(0)
    model = InceptionV3().eval()
    save_file(model.state_dict(), str(folders / "inception.safetensors"))
    args = eval_args(folders, "--inception-weights", str(folders / "inception.safetensors"))
    args[args.index("--num-images") + 1] = "10"                        # IS takes 10 splits
    args[args.index("--metrics") + 1] = "is"
    assert cli.main(args) == 0
    metrics = json.loads((folders / "run" / "metrics.json").read_text())
    # the order of the images matters to IS (the splits): eval reads them in plan order, k = 0 .. N-1
    files = [folders / "run" / "images" / name for *_, name in image_plan(len(PROMPTS), 10, 0)]
    logits = inception_logits(torch.stack([fid_mod.read_image(f) for f in files]), model)
    expected = inception_score(logits, splits=10, generator=torch.Generator().manual_seed(0))
    assert (metrics["is"], metrics["is_std"]) == pytest.approx(expected, rel=1e-9)


def test_the_clip_metric_is_torchmetrics_clip_score_of_the_images_eval_wrote(folders, tmp_path, capsys):
    """--metrics clip with a random CLIP ViT-L/14 in transformers' layout (the real configuration: eval's loader
    expects it): the figure in metrics.json equals torchmetrics' CLIPScore, given the same random model and
    transformers' processor, on the image files eval wrote and their prompts. ~1 min on two cores."""
    from safetensors.torch import save_file
    from test_metrics import VIT_L_14, SD1_TEXT, Features, hf_clip, hf_processor
    from torchmetrics.multimodal.clip_score import CLIPScore

    hf = hf_clip(VIT_L_14, SD1_TEXT, seed=5)
    weights = tmp_path / "clip-vit-l-14.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(weights))
    args = eval_args(folders, "--clip-weights", str(weights))
    args[args.index("--metrics") + 1] = "clip"
    assert cli.main(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("clip=")
    ours = json.loads((folders / "run" / "metrics.json").read_text())["clip"]

    files = sorted((folders / "run" / "images").iterdir())
    prompts = [PROMPTS[int(f.name[1:6])] for f in files]               # p{prompt index}-s{seed}.png
    images = [torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files]
    metric = CLIPScore(model_name_or_path=lambda: (Features(hf), hf_processor(pil_backend=True)))
    metric.update(images, prompts)
    ref = metric.compute().item()
    print(f"eval clip {ours:.4f}, torchmetrics {ref:.4f}")
    assert abs(ours - ref) <= 1e-3                     # test_metrics' tolerance: 100 x cos, 1e-5 of a unit vector
    # the comparison can fail: the same images against other prompts score differently
    metric.reset()
    metric.update(images, prompts[1:] + prompts[:1])
    assert abs(metric.compute().item() - ref) > 1e-2
