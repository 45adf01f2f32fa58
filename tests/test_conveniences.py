"""A1111's generation conveniences: --clip-skip, --vae, --prompts-file, --grid, and JPEG/WebP with the parameters.

References: diffusers (StableDiffusionPipeline(clip_skip=...), AutoencoderKL and its own reading of an original-
layout VAE file, from_single_file) on a small random-weight SD1 model; A1111's source for the rest, written out
in the tests (images.image_grid's row rule, piexif's EXIF layout, prompts_from_file's cmdargs).

Tolerances: images 2/255 in [0, 1] as tests/test_pipeline.py (fp32 CPU; random-weight images have a pixel std of
~0.2, so a wrong layer or VAE moves pixels by far more: each test checks that its comparison can fail);
contexts and decoded pixels 1e-5 (the same fp32 ops in another order). The VAE layouts are also checked at the
SD 1.5 VAE's full size (vae-ft-mse-840000's shapes) in one test marked slow (~20 s, 1 GB).
"""
import hashlib
import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image, TiffImagePlugin

from checkpoints import SMALL_SD1, build_pair, reference_vae
from minisd.cli import main
from minisd.images import (a1111_exif, grid_path, image_grid, parse_a1111_parameters, read_png_parameters,
                           save_image)
from minisd.prompts_file import parse_line
from minisd.vae_file import replace_vae, vae_fields

TOL = 2 / 255
PROMPT = "a red circle on a blue background, highly detailed"

pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py: small tensors, one thread


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    ours, ref, folder = build_pair(tmp_path_factory, SMALL_SD1, seed=1)
    # diffusers 0.42's clip_skip branch applies `text_encoder.text_model.final_layer_norm`; transformers 5's
    # CLIPTextModel holds final_layer_norm itself (no .text_model). Point the old name at the model, unregistered
    # (object.__setattr__: not a submodule, so no cycle in state_dict or .to()).
    if not hasattr(ref.text_encoder, "text_model"):
        object.__setattr__(ref.text_encoder, "text_model", ref.text_encoder)
    return ours, ref, folder


def _np(images):
    return np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])


def _diffusers_euler(ref, **call):
    """diffusers' image of PROMPT with Euler on the linspace schedule (minisd's euler + linspace), 32 px."""
    import diffusers
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.sd_scheduler_config, timestep_spacing="linspace")
    prompt = None if "prompt_embeds" in call else PROMPT
    return ref(prompt, num_inference_steps=4, guidance_scale=7.5, generator=torch.Generator().manual_seed(3),
               width=32, height=32, output_type="np", **call).images


def _cli(tmp_path, sd1, *flags):
    _, _, folder = sd1
    out = tmp_path / "out.png"
    assert main(["generate", PROMPT, "--model", str(folder / "model.safetensors"), "--steps", "4", "--seed", "3",
                 "--sampler", "euler", "--schedule", "linspace", "--cfg", "7.5", "--width", "32", "--height", "32",
                 "--no-prepack", "--threads", "1", "--out", str(out), *flags]) == 0
    return out


# ---------------------------------------------------------------------------------------------------------------
# --clip-skip: A1111's N (1 = the last layer) is diffusers' clip_skip = N - 1

def _diffusers_context(ref, text, clip_skip):
    """diffusers' context of `text` at its clip_skip (None: the last layer). Called for the negative prompt too:
    diffusers' StableDiffusionPipeline.encode_prompt applies clip_skip to the prompt only (its negative prompt
    always takes the last layer), A1111 to both (one FrozenCLIPEmbedderWithCustomWords encodes cond and uncond)."""
    return ref.encode_prompt(text, "cpu", 1, False, clip_skip=clip_skip)[0]


def test_clip_skip_contexts_equal_diffusers_one_less(sd1):
    ours, ref, _ = sd1
    for n in (1, 2):
        cond, uncond = ours.encode_prompts(PROMPT, "blurry", clip_skip=n)
        torch.testing.assert_close(cond, _diffusers_context(ref, PROMPT, n - 1 or None), atol=1e-5, rtol=0)
        torch.testing.assert_close(uncond, _diffusers_context(ref, "blurry", n - 1 or None), atol=1e-5, rtol=0)
    # the check can fail: the penultimate layer is another context
    assert (ours.encode_prompts(PROMPT, clip_skip=2)[0] - ours.encode_prompts(PROMPT)[0]).abs().max() > 0.1


def test_cli_clip_skip_2_equals_diffusers_clip_skip_1_and_is_recorded(sd1, tmp_path):
    _, ref, _ = sd1
    out = _cli(tmp_path, sd1, "--clip-skip", "2")
    theirs = _diffusers_euler(ref, prompt_embeds=_diffusers_context(ref, PROMPT, 1),
                              negative_prompt_embeds=_diffusers_context(ref, "", 1))
    assert np.abs(_np([Image.open(out)]) - theirs).max() <= TOL
    assert parse_a1111_parameters(read_png_parameters(out))["Clip skip"] == "2"
    # the comparison can fail: clip skip 1 is another image, and A1111 leaves "Clip skip" out then
    plain = _cli(tmp_path / "plain", sd1)
    assert np.abs(_np([Image.open(plain)]) - theirs).max() > 10 * TOL
    assert "Clip skip" not in parse_a1111_parameters(read_png_parameters(plain))


def test_clip_skip_out_of_range_is_one_line(sd1, tmp_path, capsys):
    _, _, folder = sd1
    for n in ("0", "3"):       # the small model's text encoder has 2 layers
        assert main(["generate", "x", "--model", str(folder / "model.safetensors"), "--steps", "1", "--width", "32",
                     "--height", "32", "--clip-skip", n, "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("minisd: error:") and "clip" in err.lower() and "\n" not in err


@pytest.mark.parametrize("command", ["img2img", "inpaint"])
def test_img2img_and_inpaint_take_clip_skip_and_record_it(tmp_path, command):
    """On the tiny model (2 text layers): --clip-skip 2 is the library call with clip_skip=2, another image than
    clip skip 1, and written down."""
    from minisd.pipeline import Pipeline
    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    init.save(tmp_path / "init.png")
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    extra = ["--mask", str(tmp_path / "mask.png")] if command == "inpaint" else []
    outs = []
    for n in ("1", "2"):
        outs.append(tmp_path / f"{n}.png")
        assert main([command, "a red circle", "--init-image", str(tmp_path / "init.png"), *extra, "--steps", "4",
                     "--seed", "2", "--clip-skip", n, "--no-prepack", "--out", str(outs[-1])]) == 0
    pipe = Pipeline.load(None, log=lambda *_: None, prepack=False)
    call = pipe.img2img if command == "img2img" else lambda *a, **k: pipe.inpaint(a[0], a[1], mask, *a[2:], **k)
    library = call("a red circle", init, 0.75 if command == "img2img" else 1.0, steps=4, seed=[2], clip_skip=2)
    pixels = [np.asarray(Image.open(out), dtype=np.int16) for out in outs]
    assert np.abs(pixels[1] - np.asarray(library.images[0], dtype=np.int16)).max() <= 1
    assert np.abs(pixels[1] - pixels[0]).max() > 10
    assert parse_a1111_parameters(read_png_parameters(outs[1]))["Clip skip"] == "2"


def test_eval_takes_clip_skip_into_its_settings_and_images(tmp_path):
    import json
    (tmp_path / "prompts.txt").write_text("a red circle on a blue background\n")
    assert main(["eval", "--prompts", str(tmp_path / "prompts.txt"), "--num-images", "1", "--out",
                 str(tmp_path / "run"), "--steps", "2", "--metrics", "adherence", "--clip-skip", "2"]) == 0
    assert json.loads((tmp_path / "run" / "settings.json").read_text())["clip_skip"] == 2
    image = next((tmp_path / "run" / "images").iterdir())
    assert parse_a1111_parameters(read_png_parameters(image))["Clip skip"] == "2"


# ---------------------------------------------------------------------------------------------------------------
# --vae: the original layout (bare, under first_stage_model., .ckpt with A1111's ignored keys) and diffusers'

@pytest.fixture(scope="module")
def vae_files(tmp_path_factory):
    """One random VAE of the small model's shape in four files, and diffusers' AutoencoderKL of it as diffusers
    reads the original file itself (from_single_file)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from checkpoints import reference_diffusers_vae
    d = tmp_path_factory.mktemp("vae")
    torch.manual_seed(11)
    is_norm_scale = lambda k: k.endswith(".weight") and "norm" in k.split(".")[-2]
    state = {k: torch.randn_like(t) * 0.05 + (1.0 if is_norm_scale(k) else 0.0)
             for k, t in reference_vae(SMALL_SD1, device="cpu").state_dict().items()}
    save_file(state, d / "vae-bare.safetensors")
    save_file({"first_stage_model." + k: v for k, v in state.items()}, d / "vae-prefixed.safetensors")
    torch.save({"state_dict": {**state, "model_ema.decay": torch.tensor(0.9999),
                               "loss.logvar": torch.zeros(())}}, d / "vae-ft.ckpt")
    reference_diffusers_vae(SMALL_SD1).save_config(d / "config")
    ref = AutoencoderKL.from_single_file(str(d / "vae-bare.safetensors"), config=str(d / "config"),
                                         local_files_only=True).eval()
    ref.save_pretrained(d / "diffusers-vae")            # config.json + diffusion_pytorch_model.safetensors
    return d, ref


@pytest.mark.parametrize("name", ["vae-bare.safetensors", "vae-prefixed.safetensors", "vae-ft.ckpt",
                                  "diffusers-vae"])
def test_vae_file_decodes_as_diffusers(sd1, vae_files, name):
    ours, _, _ = sd1
    d, ref = vae_files
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    before = ours.decode(latents)
    try:
        replace_vae(ours.model, str(d / name))
        with torch.no_grad():
            theirs = ref.decode(latents / ref.config.scaling_factor).sample
        torch.testing.assert_close(ours.decode(latents), theirs, atol=1e-5, rtol=0)
        assert (before - theirs).abs().max() > 0.1          # the comparison can fail: the model's own VAE differs
    finally:
        ours.model.vae.load_state_dict(_own_vae(sd1))


def _own_vae(sd1):
    """The small model's own VAE weights, read back from its file (to undo replace_vae between tests)."""
    from safetensors.torch import load_file
    _, _, folder = sd1
    full = load_file(folder / "model.safetensors")
    return {k[len("first_stage_model."):]: v for k, v in full.items() if k.startswith("first_stage_model.")}


def test_cli_vae_equals_diffusers_with_that_vae_and_records_name_and_hash(sd1, vae_files, tmp_path):
    _, ref, _ = sd1
    d, ref_vae = vae_files
    out = _cli(tmp_path, sd1, "--vae", str(d / "vae-ft.ckpt"))
    own_vae = ref.vae
    ref.vae = ref_vae
    try:
        theirs = _diffusers_euler(ref)
    finally:
        ref.vae = own_vae
    assert np.abs(_np([Image.open(out)]) - theirs).max() <= TOL
    assert np.abs(_np([Image.open(out)]) - _diffusers_euler(ref)).max() > 10 * TOL     # the model's own VAE
    params = parse_a1111_parameters(read_png_parameters(out))
    # A1111's modules/sd_vae.py: the file's name, and hashes.sha256(file)[:10]
    assert params["VAE"] == "vae-ft.ckpt"
    assert params["VAE hash"] == hashlib.sha256((d / "vae-ft.ckpt").read_bytes()).hexdigest()[:10]
    assert vae_fields(str(d / "diffusers-vae"))["vae_hash"] == hashlib.sha256(
        (d / "diffusers-vae" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()[:10]


def test_a_vae_of_the_wrong_shape_or_kind_is_one_line(sd1, vae_files, tmp_path, capsys):
    from safetensors.torch import save_file
    d, _ = vae_files
    _, _, folder = sd1
    wrong_shape = tmp_path / "big.safetensors"
    save_file({k: torch.zeros(v.shape[0] * 2, *v.shape[1:]) if k == "decoder.conv_in.weight" else v
               for k, v in _own_vae(sd1).items()}, wrong_shape)
    cases = [(wrong_shape, "decoder.conv_in.weight"),
             (folder / "model.safetensors", "whole SD checkpoint"),
             (tmp_path / "missing.safetensors", "no such file")]
    for path, words in cases:
        assert main(["generate", "x", "--model", str(folder / "model.safetensors"), "--steps", "1", "--width", "32",
                     "--height", "32", "--vae", str(path), "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("minisd: error:") and words in err and "\n" not in err, err


# ---------------------------------------------------------------------------------------------------------------
# JPEG / WebP: the parameters in the EXIF UserComment, as A1111 writes them with piexif

def _piexif_user_comment_block(text):
    """piexif.dump({"Exif": {0x9286: piexif.helper.UserComment.dump(text, encoding="unicode")}}), written out from
    piexif's _dump.py: big-endian TIFF header; IFD0 with one entry (ExifTag, LONG, the Exif IFD's offset 26) and a
    zero next-IFD offset; the Exif IFD with one entry (UserComment, UNDEFINED, its length, offset 40) and no
    next-IFD offset; then "UNICODE\\0" + UTF-16BE."""
    comment = b"UNICODE\x00" + text.encode("utf-16-be")
    return (b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08"
            + b"\x00\x01" + b"\x87\x69" + b"\x00\x04" + b"\x00\x00\x00\x01" + b"\x00\x00\x00\x1a" + b"\x00" * 4
            + b"\x00\x01" + b"\x92\x86" + b"\x00\x07" + struct.pack(">I", len(comment)) + b"\x00\x00\x00\x28"
            + comment)


TEXT = 'a fox, "quoted" ünïcödé 狐\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 3'


def test_exif_block_is_piexifs_and_pillow_reads_the_user_comment_as_undefined():
    block = a1111_exif(TEXT)
    assert block == _piexif_user_comment_block(TEXT)
    exif = Image.Exif()
    exif.load(block[6:])
    assert exif.get_ifd(0x8769)[0x9286] == b"UNICODE\x00" + TEXT.encode("utf-16-be")
    tiff = io.BytesIO(block[6:])            # IFD0, then the Exif IFD it points to: the type A1111's piexif needs
    ifd0, exif_ifd = (TiffImagePlugin.ImageFileDirectory_v2(block[6:14]) for _ in range(2))
    tiff.seek(8)
    ifd0.load(tiff)
    tiff.seek(ifd0[0x8769])
    exif_ifd.load(tiff)
    assert exif_ifd.tagtype[0x9286] == 7         # UNDEFINED (pillow's own Image.Exif would write BYTE, 1)


@pytest.mark.parametrize("suffix", [".jpg", ".webp", ".png"])
def test_jpg_webp_png_carry_the_parameters_and_our_reader_reads_them(tmp_path, suffix):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    path = save_image(image, tmp_path / f"a{suffix}", TEXT)
    with Image.open(path) as im:
        assert im.format == {".jpg": "JPEG", ".webp": "WEBP", ".png": "PNG"}[suffix]
        if suffix != ".png":       # pillow alone reads it back, as A1111's read_info_from_image does with piexif
            comment = im.getexif().get_ifd(0x8769)[0x9286]
            assert comment[:8] == b"UNICODE\x00" and comment[8:].decode("utf-16-be") == TEXT
    assert read_png_parameters(path) == TEXT
    assert not list(tmp_path.glob("*.tmp"))


def test_cli_format_and_out_suffix(tmp_path, capsys):
    assert main(["generate", "a red circle", "--steps", "2", "--seed", "1", "--out", str(tmp_path / "d"),
                 "--format", "jpg"]) == 0
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["00000-1.jpg"]
    assert parse_a1111_parameters(read_png_parameters(tmp_path / "d" / "00000-1.jpg"))["Seed"] == "1"
    assert main(["generate", "a red circle", "--steps", "2", "--seed", "1", "--out", str(tmp_path / "x.webp")]) == 0
    assert Image.open(tmp_path / "x.webp").format == "WEBP"
    capsys.readouterr()
    assert main(["generate", "x", "--steps", "2", "--out", str(tmp_path / "x.png"), "--format", "webp"]) == 2
    assert "disagree" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# --grid: A1111's images.image_grid with its default options

def _a1111_rows_cols(n):
    # modules/images.py image_grid, opts.n_rows = -1, grid_prevent_empty_spots = False
    import math
    rows = min(round(math.sqrt(n)), n)
    return rows, math.ceil(n / rows)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7, 8, 10])
def test_grid_layout_is_a1111s(n):
    images = [Image.new("RGB", (8, 6), (10 * i, 0, 0)) for i in range(n)]
    grid = image_grid(images)
    rows, cols = _a1111_rows_cols(n)
    assert grid.size == (8 * cols, 6 * rows)
    for i in range(n):      # image i in row i // cols, column i % cols; empty cells white
        assert grid.getpixel((i % cols * 8 + 3, i // cols * 6 + 3)) == (10 * i, 0, 0)
    for i in range(n, rows * cols):
        assert grid.getpixel((i % cols * 8 + 3, i // cols * 6 + 3)) == (255, 255, 255)


def test_grid_names_count_on(tmp_path):
    assert grid_path(tmp_path).name == "grid-0000.png"
    (tmp_path / "grid-0004.png").touch()
    (tmp_path / "00007-3.png").touch()
    assert grid_path(tmp_path, ".webp").name == "grid-0005.webp"
    assert grid_path(tmp_path / "out.jpg").name == "out-grid.jpg"


def test_cli_grid_beside_a_batch_with_the_first_images_parameters(tmp_path):
    out = tmp_path / "d"
    assert main(["generate", "a red circle", "--steps", "2", "--seed", "5", "--batch-size", "3", "--out", str(out),
                 "--grid"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00000-5.png", "00001-6.png", "00002-7.png", "grid-0000.png"]
    grid = Image.open(out / "grid-0000.png")
    first = Image.open(out / "00000-5.png")
    assert grid.size == (2 * first.width, 2 * first.height)
    assert np.array_equal(np.asarray(grid.crop((0, 0, *first.size))), np.asarray(first))
    assert read_png_parameters(out / "grid-0000.png") == read_png_parameters(out / "00000-5.png")


# ---------------------------------------------------------------------------------------------------------------
# --prompts-file: A1111's scripts/prompts_from_file.py lines

def test_prompt_lines_parse_as_a1111s_cmdargs():
    assert parse_line("a watercolour fox") == {"prompt": "a watercolour fox"}
    line = ('--prompt "a cat" on a mat --negative_prompt "ugly" --steps 20 --seed 3 --cfg_scale 7 '
            '--sampler_name "Euler a" --width 512 --height 512')
    assert parse_line(line) == {"prompt": "a cat on a mat", "negative_prompt": "ugly", "steps": 20, "seed": 3,
                                "cfg_scale": 7.0, "sampler_name": "Euler a", "width": 512, "height": 512}
    for bad, words in [("--prompt x --tiling true", "A1111 option minisd does not have"),
                       ("--prompt x --frobnicate 1", "unknown option --frobnicate"),
                       ("--prompt x --steps many", "needs an integer"),
                       ("--prompt x --steps", "has no value"),
                       ("--steps 3", "no --prompt")]:
        with pytest.raises(ValueError, match=words):
            parse_line(bad)


def test_cli_prompts_file_one_run_per_line_with_its_options(tmp_path, capsys):
    lines = tmp_path / "prompts.txt"
    lines.write_text("a red circle\n\n--prompt a blue square --seed 7 --steps 3 --cfg_scale 5 --sampler_name "
                     "\"Euler a\" --batch_size 2\n")
    out = tmp_path / "d"
    assert main(["generate", "--prompts-file", str(lines), "--steps", "2", "--seed", "1", "--out", str(out),
                 "--grid"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00000-1.png", "00001-7.png", "00002-8.png", "grid-0000.png"]
    first = parse_a1111_parameters(read_png_parameters(out / "00000-1.png"))
    assert (first["Prompt"], first["Steps"], first["Seed"]) == ("a red circle", "2", "1")
    second = parse_a1111_parameters(read_png_parameters(out / "00002-8.png"))
    assert (second["Prompt"], second["Steps"], second["Seed"], second["CFG scale"], second["Sampler"]) == \
        ("a blue square", "3", "8", "5.0", "Euler a")
    # a line's image equals the same settings on the command line (batched: up to one level of 255, as
    # tests/test_pipeline.py's batch test), and the comparison can fail (the first line's image)
    assert main(["generate", "a blue square", "--seed", "7", "--steps", "3", "--cfg", "5", "--sampler", "Euler a",
                 "--out", str(tmp_path / "alone.png")]) == 0
    alone = np.asarray(Image.open(tmp_path / "alone.png"), dtype=np.int16)
    assert np.abs(alone - np.asarray(Image.open(out / "00001-7.png"), dtype=np.int16)).max() <= 1
    assert np.abs(alone - np.asarray(Image.open(out / "00000-1.png"), dtype=np.int16)).max() > 10
    capsys.readouterr()
    lines.write_text("a red circle\n--prompt x --restore_faces true\n")
    assert main(["generate", "--prompts-file", str(lines), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"minisd: error: {lines} line 2: --restore_faces is an A1111 option minisd does not have"
    assert main(["generate", "a cat", "--prompts-file", str(lines), "--out", str(out)]) == 2
    assert main(["generate", "--prompts-file", str(lines), "--out", str(tmp_path / "one.png")]) == 2


@pytest.mark.slow
def test_full_size_vae_files_decode_as_diffusers(tmp_path):
    """At the SD 1.5 VAE's own size (vae-ft-mse-840000's shapes, 84M parameters): a random diffusers
    AutoencoderKL saved as a diffusers folder and as the original layout (diffusers' own reading of it is the
    reference), each loaded with replace_vae over a VAE of that config, decodes as diffusers does."""
    import types
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from checkpoints import reference_diffusers_vae
    from minisd.config import SD15
    from minisd.vae import VAE
    torch.manual_seed(2)
    ldm = {k: torch.randn_like(t) * 0.02 + (1.0 if k.endswith(".weight") and "norm" in k.split(".")[-2] else 0.0)
           for k, t in reference_vae(SD15, device="cpu").state_dict().items()}
    save_file(ldm, tmp_path / "vae-ft-mse.safetensors")
    del ldm
    reference_diffusers_vae(SD15).save_config(tmp_path / "config")
    ref = AutoencoderKL.from_single_file(str(tmp_path / "vae-ft-mse.safetensors"), config=str(tmp_path / "config"),
                                         local_files_only=True).eval()
    ref.save_pretrained(tmp_path / "sd-vae-ft-mse")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = ref.decode(latents / ref.config.scaling_factor).sample
    del ref
    holder = types.SimpleNamespace(vae=VAE(SD15.vae).eval())
    for name in ("vae-ft-mse.safetensors", "sd-vae-ft-mse"):
        replace_vae(holder, str(tmp_path / name))
        with torch.no_grad():
            torch.testing.assert_close(holder.vae.decode(latents), theirs, atol=1e-5, rtol=0)
