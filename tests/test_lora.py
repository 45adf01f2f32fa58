"""LoRA files are read in every layout users have, merged at their scale, and give diffusers' images.

Parity: the same random LoRA file loaded by minisd (Pipeline.set_loras) and by diffusers' load_lora_weights +
set_adapters at multiplier 0.8 gives images within 2/255 (max abs pixel difference in [0, 1], fp32 CPU: the
issue's figure, as in test_pipeline.py). The LoRAs change the image by far more than that, and a wrong
multiplier, an ignored alpha or a LoRA left off the text encoder is caught (test_lora_parity_can_fail).
"""
import numpy as np
import pytest
import torch

from checkpoints import SMALL_SD1, SMALL_SD2, build_pair, reference_diffusers_unet, reference_unet
from minisd import lora, merge
from minisd.cli import main
from minisd.config import SD15, SD21_V
from minisd.fast import onednn
from minisd.pipeline import Pipeline

TOL = 2 / 255
PROMPT = "a red circle on a blue background"
NEG = "blurry"
MULT = 0.8


pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py: small tensors, one thread


def random_lora(cfg, seed, rank=4, alpha=2.0, which="default"):
    """{kohya name: Factors} on `which` targets: down ~ N(0, 1/in), up ~ N(0, 0.3^2/r): a change of the size of
    a good fraction of the weights, so that it shows in the images."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, layer in lora.targets(cfg, which).items():
        out_f, in_f, *k = layer.shape
        down = torch.randn(rank, in_f, *k, generator=g) / (in_f * int(np.prod(k or [1]))) ** 0.5
        up = torch.randn(out_f, rank, *[1] * len(k), generator=g) * 0.3 / rank ** 0.5
        out[name] = lora.Factors(down, up, alpha)
    return out


def _np(images):
    return np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return build_pair(tmp_path_factory, SMALL_SD1, seed=1)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return build_pair(tmp_path_factory, SMALL_SD2, seed=2)


def ours_image(pipe, seed=7):
    return _np(pipe.generate(PROMPT, NEG, 4, 7.5, "euler", "linspace", seed=seed, width=32, height=32).images)


def theirs_image(ref, adapters, seed=7):
    """diffusers with the LoRA files `adapters` [(file, multiplier)] loaded by load_lora_weights."""
    import diffusers
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.sd_scheduler_config,
                                                                 timestep_spacing="linspace")
    names = [f"a{i}" for i in range(len(adapters))]
    for name, (path, _) in zip(names, adapters):
        ref.load_lora_weights(str(path), adapter_name=name)
    try:
        if adapters:
            ref.set_adapters(names, adapter_weights=[m for _, m in adapters])
        return ref(PROMPT, negative_prompt=NEG, num_inference_steps=4, guidance_scale=7.5,
                   generator=torch.Generator().manual_seed(seed), width=32, height=32, output_type="np").images
    finally:
        if adapters:
            ref.unload_lora_weights()


def _compare(mine, theirs, base):
    err = np.abs(mine - theirs).max()
    effect = np.abs(theirs - base).max()
    print(f"[parity] max abs pixel error {err:.5f}; the LoRA moved pixels by up to {effect:.3f}")
    assert effect > 10 * TOL, "the LoRA must change the image for the comparison to mean anything"
    assert err <= TOL, f"max abs pixel error {err:.4f}"


# ---------------------------------------------------------------------------------------------------------------
# the layer tables, against the reference networks' module names at the full SD1.5 / SD2.1 configs


def _transformers_text(cfg):
    from transformers import CLIPTextConfig, CLIPTextModel
    t = cfg.text
    with torch.device("meta"):
        return CLIPTextModel(CLIPTextConfig(hidden_size=t.width, intermediate_size=4 * t.width,
                                            num_hidden_layers=t.layers, num_attention_heads=t.heads,
                                            hidden_act=t.activation))


@pytest.mark.parametrize("cfg", [SD15, SD21_V], ids=["sd15", "sd21-v"])
def test_layer_table_names_every_diffusers_ldm_and_transformers_layer(cfg):
    table, names = lora.layers(cfg), lora.aliases(cfg)
    theirs = {"unet." + n: m for n, m in reference_diffusers_unet(cfg).named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    # transformers >= 5.6 names CLIPTextModel's modules without `text_model.`; LoRA files keep it
    theirs.update({"text_encoder.text_model." + n.removeprefix("text_model."): m
                   for n, m in _transformers_text(cfg).named_modules()
                   if isinstance(m, torch.nn.Linear) and ".layers." in n})
    ours = {layer.diffusers: layer for layer in table.values()}
    assert set(ours) == set(theirs)                     # both directions: nothing missing, nothing extra
    for name, layer in ours.items():
        assert tuple(theirs[name].weight.shape) == layer.shape, name
        assert names[layer.kohya] == names[layer.diffusers] == layer.kohya
    ldm = [n for n, m in reference_unet(cfg).named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len(ldm) == sum(1 for k in table if k.startswith("lora_unet_"))
    for n in ldm:                                       # LDM-named kohya keys reach the same parameter
        assert table[names["lora_unet_" + n.replace(".", "_")]].param == f"unet.{n}.weight"


@pytest.mark.parametrize("cfg,te_modules", [(SD15, 72), (SD21_V, 138)], ids=["sd15", "sd21-v"])
def test_default_targets_are_kohyas_and_attention_targets_diffusers(cfg, te_modules):
    """kohya's rule, on diffusers' modules: every Linear and 1x1 Conv2d inside a Transformer2DModel, and every
    Linear inside CLIPAttention / CLIPMLP (kohya logs 192 U-Net modules for SD1.5 and SD2.1)."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    unet = reference_diffusers_unet(cfg)
    kohya = set()
    for name, module in unet.named_modules():
        if isinstance(module, Transformer2DModel):
            for sub, m in module.named_modules():
                if isinstance(m, torch.nn.Linear) or (isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)):
                    kohya.add("lora_unet_" + f"{name}.{sub}".replace(".", "_"))
    text = _transformers_text(cfg)
    kohya |= {"lora_te_text_model_" + n.removeprefix("text_model.").replace(".", "_") for n, m in text.named_modules()
              if isinstance(m, torch.nn.Linear) and (".self_attn." in n or ".mlp." in n)}
    assert set(lora.targets(cfg)) == kohya
    assert sum(k.startswith("lora_unet_") for k in kohya) == 192
    assert sum(k.startswith("lora_te_") for k in kohya) == te_modules
    attention = {layer.diffusers.rsplit(".", 1)[-1] if "to_out" not in layer.diffusers else "to_out.0"
                 for layer in lora.targets(cfg, "attention").values()}
    assert attention == {"to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj"}


# ---------------------------------------------------------------------------------------------------------------
# parity with diffusers' load_lora_weights


def _ldm_named(path, layers_, cfg):
    """The same LoRA as a kohya file with LDM module names (lora_unet_input_blocks_1_1_...)."""
    from weights_convert.io import write_safetensors
    table = lora.layers(cfg)
    tensors = {}
    for name, f in layers_.items():
        key = table[name].ldm or name
        tensors.update({f"{key}.lora_down.weight": f.down, f"{key}.lora_up.weight": f.up,
                        f"{key}.alpha": torch.tensor(f.alpha)})
    write_safetensors(str(path), tensors)


@pytest.mark.parametrize("model", ["sd1", "sd2"])
@pytest.mark.parametrize("layout", ["kohya", "kohya-ldm-names", "diffusers"])
def test_lora_file_gives_diffusers_image(request, tmp_path, model, layout):
    ours, ref, _ = request.getfixturevalue(model)
    cfg = ours.model.config
    factors = random_lora(cfg, seed=3)
    kohya = tmp_path / "kohya.safetensors"
    lora.save_kohya(kohya, factors)
    mine_file = kohya
    if layout == "kohya-ldm-names":          # diffusers misreads LDM numbering: it gets the kohya twin
        mine_file = tmp_path / "ldm.safetensors"
        _ldm_named(mine_file, factors, cfg)
    elif layout == "diffusers":
        mine_file = kohya = tmp_path / "pytorch_lora_weights.safetensors"
        lora.save_diffusers(kohya, factors, cfg)
    base = theirs_image(ref, [])
    theirs = theirs_image(ref, [(kohya, MULT)])
    ours.set_loras([(str(mine_file), MULT)])
    try:
        mine = ours_image(ours)
    finally:
        ours.set_loras([])
    _compare(mine, theirs, base)


def test_two_loras_at_once_each_with_its_scale(sd1, tmp_path):
    ours, ref, _ = sd1
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    lora.save_kohya(a, random_lora(SMALL_SD1, seed=4, rank=4, alpha=4.0))
    lora.save_kohya(b, random_lora(SMALL_SD1, seed=5, rank=8, alpha=1.0, which="attention"))
    ours.set_loras([(str(a), 0.8), (str(b), 0.5)])
    try:
        mine = ours_image(ours)
    finally:
        ours.set_loras([])
    _compare(mine, theirs_image(ref, [(a, 0.8), (b, 0.5)]), theirs_image(ref, []))


def test_no_alpha_means_scale_one(sd1, tmp_path):
    """kohya and peft both read a missing alpha as alpha = rank; written here with diffusers' lora.down/up keys."""
    from weights_convert.io import write_safetensors
    ours, ref, _ = sd1
    table = lora.layers(SMALL_SD1)
    factors = random_lora(SMALL_SD1, seed=6, which="attention")
    path = tmp_path / "old_diffusers.safetensors"
    write_safetensors(str(path), {f"{table[n].diffusers}.lora.{part}.weight": getattr(f, part)
                                  for n, f in factors.items() for part in ("down", "up")})
    read = lora.read(path, SMALL_SD1)
    assert all(f.alpha is None and f.scale() == 1.0 for f in read.layers.values())
    ours.set_loras([(str(path), MULT)])
    try:
        mine = ours_image(ours)
    finally:
        ours.set_loras([])
    kohya = tmp_path / "kohya.safetensors"                 # the oracle reads the same factors at alpha = rank
    lora.save_kohya(kohya, {n: lora.Factors(f.down, f.up, None) for n, f in factors.items()})
    _compare(mine, theirs_image(ref, [(kohya, MULT)]), theirs_image(ref, []))


def test_lora_parity_can_fail(sd1, tmp_path):
    """A wrong multiplier, alpha ignored, or the text-encoder half left off all move pixels well past 2/255."""
    ours, ref, _ = sd1
    path = tmp_path / "k.safetensors"
    lora.save_kohya(path, random_lora(SMALL_SD1, seed=3))
    theirs = theirs_image(ref, [(path, MULT)])
    ignored_alpha = tmp_path / "no_alpha.safetensors"
    lora.save_kohya(ignored_alpha, {n: lora.Factors(f.down, f.up, None) for n, f in
                                    random_lora(SMALL_SD1, seed=3).items()})
    for spec in ([(str(path), 1.0)], [(str(ignored_alpha), MULT)], [(str(path), MULT, 0.0)]):
        ours.set_loras(spec)
        try:
            err = np.abs(ours_image(ours) - theirs).max()
        finally:
            ours.set_loras([])
        print(f"[can fail] {spec}: {err:.4f}")
        assert err > 3 * TOL


# ---------------------------------------------------------------------------------------------------------------
# the base weights come back, on the oneDNN CPU path too


def test_removing_a_lora_gives_the_base_image_bit_for_bit_on_the_onednn_path(sd1, tmp_path):
    if not onednn.available():
        pytest.skip("this PyTorch has no oneDNN")
    _, _, d = sd1
    pipe = Pipeline.load(str(d / "model.safetensors"), device="cpu", dtype="fp32", log=lambda *_: None,
                         prepack=False)
    plain = Pipeline.load(str(d / "model.safetensors"), device="cpu", dtype="fp32", log=lambda *_: None,
                          prepack=False)
    onednn.prepare(pipe.model.unet)           # what Pipeline.load does where it measures oneDNN faster
    onednn.prepare(pipe.model.text_encoder)
    path = tmp_path / "k.safetensors"
    lora.save_kohya(path, random_lora(SMALL_SD1, seed=3))
    base = ours_image(pipe)
    pipe.set_loras([(str(path), MULT)])
    assert onednn.is_prepared(pipe.model.unet) and onednn.is_prepared(pipe.model.text_encoder)
    with_lora = ours_image(pipe)
    plain.set_loras([(str(path), MULT)])
    # the prepared 1x1 convs (SD1's proj_in/proj_out) were laid out again from the merged weights
    assert np.abs(with_lora - ours_image(plain)).max() <= TOL      # oneDNN vs plain kernels: rounding only
    assert np.abs(with_lora - base).max() > 10 * TOL
    pipe.set_loras([])
    assert onednn.is_prepared(pipe.model.unet)
    assert np.array_equal(ours_image(pipe), base)
    plain.set_loras([])
    reference = Pipeline.load(str(d / "model.safetensors"), device="cpu", dtype="fp32", log=lambda *_: None,
                              prepack=False).model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in plain.model.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------
# A1111's <lora:NAME:MULT> and errors before any image


def test_prompt_tag_equals_set_loras_and_a_prompt_without_it_the_base_image(sd1, tmp_path):
    ours, _, _ = sd1
    (tmp_path / "styles").mkdir()
    path = tmp_path / "styles" / "arcane.safetensors"
    lora.save_kohya(path, random_lora(SMALL_SD1, seed=3))
    base = ours_image(ours)
    ours.set_loras([(str(path), MULT)])
    try:
        expected = ours_image(ours)
    finally:
        ours.set_loras([])
    ours.lora_dir = str(tmp_path)
    try:
        tagged = _np(ours.generate(PROMPT + "<lora:arcane:0.8>", NEG, 4, 7.5, "euler", "linspace", seed=7,
                                   width=32, height=32).images)
        assert np.array_equal(tagged, expected)
        assert np.array_equal(ours_image(ours), base)
        with pytest.raises(lora.LoRAError, match="no LoRA named 'missing'"):
            ours.generate(PROMPT + "<lora:missing:1>", steps=2, seed=1, width=32, height=32)
    finally:
        ours.lora_dir = None
    with pytest.raises(ValueError, match="no LoRA folder is set"):
        ours.generate(PROMPT + "<lora:arcane>", steps=2, seed=1, width=32, height=32)


def _write(path, tensors):
    from weights_convert.io import write_safetensors
    write_safetensors(str(path), tensors)
    return str(path)


def test_bad_files_are_one_line_errors_naming_the_first_offending_key(sd1, tmp_path):
    ours, _, _ = sd1
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    good = {f"{name}.lora_down.weight": torch.zeros(4, 64), f"{name}.lora_up.weight": torch.zeros(64, 4),
            f"{name}.alpha": torch.tensor(4.0)}
    cases = [
        ({**good, "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 64)},
         "unknown key 'lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight'"),
        ({**good, f"{name}.lora_up.weight": torch.zeros(64, 8)}, f"rank mismatch: '{name}.lora_down.weight'"),
        ({f"{name}.lora_down.weight": torch.zeros(4, 64)}, f"'{name}.lora_down.weight' has no up factor"),
        ({**good, f"{name}.lora_down.weight": torch.zeros(4, 768), f"{name}.lora_up.weight": torch.zeros(64, 4)},
         f"'{name}.lora_down.weight' has shape \\(4, 768\\)"),
        ({**good, f"{name}.dora_scale": torch.zeros(1, 64)}, "DoRA"),
    ]
    before = {k: v.clone() for k, v in ours.model.state_dict().items()}
    for i, (tensors, message) in enumerate(cases):
        with pytest.raises(lora.LoRAError, match=message) as e:
            ours.set_loras([(_write(tmp_path / f"{i}.safetensors", tensors), 1.0)])
        assert "\n" not in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in ours.model.state_dict().items())


@pytest.mark.parametrize("made_for,used_on", [(SD15, SD21_V), (SD21_V, SD15)], ids=["sd1-on-sd2", "sd2-on-sd1"])
def test_a_lora_for_the_other_base_model_is_refused_by_its_first_key(tmp_path, made_for, used_on):
    path = tmp_path / "other.safetensors"
    factors = random_lora(made_for, seed=0, rank=1)
    lora.save_kohya(path, factors)
    first = next(iter(factors))
    with pytest.raises(lora.LoRAError, match=f"key '{first}.lora_down.weight' has shape"):
        lora.read(path, used_on)


def test_kohya_diffusers_and_ldm_names_read_to_the_same_factors(tmp_path):
    cfg = SMALL_SD2
    factors = random_lora(cfg, seed=1)
    paths = [tmp_path / "k.safetensors", tmp_path / "d.safetensors", tmp_path / "l.safetensors"]
    lora.save_kohya(paths[0], factors)
    lora.save_diffusers(paths[1], factors, cfg)
    _ldm_named(paths[2], factors, cfg)
    read = [lora.read(p, cfg).layers for p in paths]
    assert all(list(r) == list(factors) for r in read)
    for name, f in factors.items():
        deltas = [lora.delta(lora.layers(cfg)[name], r[name], 0.8) for r in read]
        assert torch.allclose(deltas[0], deltas[1], rtol=1e-6, atol=1e-7) and torch.equal(deltas[0], deltas[2])


def test_lora_pt_file_is_read_without_running_its_pickle(tmp_path):
    name = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    torch.save({f"{name}.lora_down.weight": torch.ones(2, 64), f"{name}.lora_up.weight": torch.ones(256, 2)},
               tmp_path / "a.pt")
    assert lora.read(tmp_path / "a.pt", SMALL_SD1).layers[name].rank == 2

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refusing to load"):
        lora.read(tmp_path / "evil.pt", SMALL_SD1)


# ---------------------------------------------------------------------------------------------------------------
# the command line: --lora, --lora-dir, merge-lora


def _cli(model, out, prompt, *extra):
    return main(["generate", prompt, "--model", model, "--steps", "3", "--width", "32", "--height", "32",
                 "--seed", "5", "--out", str(out), "--device", "cpu", "--sampler", "euler", *extra])


def _png(path):
    from PIL import Image
    return np.asarray(Image.open(path))


def _close(a, b):
    # each CLI run measures whether oneDNN-prepared layers are faster (minisd.fast.MeasuredChoice) and may choose
    # differently from the last: the kernels differ in float rounding only, hence 2/255 and not equality
    return np.abs(_png(a).astype(int) - _png(b)).max() <= 2


def test_cli_lora_flags_and_merge_lora(sd1, tmp_path, capsys):
    _, _, d = sd1
    model = str(d / "model.safetensors")
    (tmp_path / "loras").mkdir()
    path = tmp_path / "loras" / "arcane.safetensors"
    lora.save_kohya(path, random_lora(SMALL_SD1, seed=3))
    assert _cli(model, tmp_path / "base.png", PROMPT) == 0
    assert _cli(model, tmp_path / "flag.png", PROMPT, "--lora", f"{path}:0.8") == 0
    assert _cli(model, tmp_path / "tag.png", PROMPT + " <lora:arcane:0.8>", "--lora-dir",
                str(tmp_path / "loras")) == 0
    assert _close(tmp_path / "flag.png", tmp_path / "tag.png")
    assert np.abs(_png(tmp_path / "flag.png").astype(int) - _png(tmp_path / "base.png")).max() > 10

    merged = tmp_path / "merged.safetensors"
    assert main(["merge-lora", "--model", model, "--lora", f"{path}:0.8", "--out", str(merged)]) == 0
    assert not (tmp_path / "merged.safetensors.partial").exists()
    from weights_convert.io import SafetensorsFile
    assert set(SafetensorsFile(str(merged))) == set(SafetensorsFile(model))       # the input's LDM layout
    assert _cli(str(merged), tmp_path / "merged.png", PROMPT) == 0
    assert _close(tmp_path / "merged.png", tmp_path / "flag.png")

    capsys.readouterr()
    assert main(["merge-lora", "--model", model, "--lora", str(path), "--out", str(merged)]) == 2
    assert "exists" in capsys.readouterr().err
    bad = _write(tmp_path / "bad.safetensors", {"nonsense.weight": torch.zeros(1)})
    assert _cli(model, tmp_path / "x.png", PROMPT, "--lora", bad) == 2
    err = capsys.readouterr().err
    assert "unknown key 'nonsense.weight'" in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_merge_lora_keeps_a_minisd_file_minisd_and_equals_the_applied_lora(sd1, tmp_path):
    from minisd.convert import convert
    from weights_convert.io import SafetensorsFile
    _, _, d = sd1
    native = tmp_path / "small.minisd.safetensors"
    convert(str(d / "model.safetensors"), str(native), "minisd")
    path = tmp_path / "k.safetensors"
    lora.save_kohya(path, random_lora(SMALL_SD1, seed=8))
    merged = tmp_path / "merged.safetensors"
    merge.merge_checkpoint(str(native), [(str(path), 0.6)], str(merged), log=lambda *_: None)
    assert SafetensorsFile(str(merged)).metadata["format"] == "minisd"
    load = lambda p: Pipeline.load(str(p), device="cpu", dtype="fp32", log=lambda *_: None, prepack=False)
    applied = load(native)
    applied.set_loras([(str(path), 0.6)])
    assert np.array_equal(ours_image(load(merged)), ours_image(applied))     # the same fp32 sums: bit for bit
