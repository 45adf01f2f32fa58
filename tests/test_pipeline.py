"""txt2img and img2img are image-for-image equal to diffusers' StableDiffusionPipeline / Img2ImgPipeline loading
the same official-layout file, and to diffusers' networks driven by k-diffusion's samplers.

Tolerance: max abs pixel difference <= 2/255 in [0, 1], fp32 on CPU (the issue's figure). The images are
random-weight models' outputs with a pixel std of ~0.2, so a wrong step, seed, schedule or prompt moves pixels
by far more than that (test_parity_can_fail shows it).
"""
import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from checkpoints import SMALL_SD1, SMALL_SD2, diffusers_from_single_file, write_diffusers_config, write_ldm_checkpoint
from minisd import lora
from minisd.config import TINY
from minisd.pipeline import Pipeline
from minisd.tiny import shapes

TOL = 2 / 255
PROMPT = "a red circle on a blue background, highly detailed"
NEG = "blurry, low quality"


pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py: small tensors, one thread


def _build(tmp_path_factory, cfg, seed):
    d = tmp_path_factory.mktemp(cfg.name)
    ckpt = d / "model.safetensors"
    write_ldm_checkpoint(ckpt, cfg, seed=seed, parameterization=cfg.prediction)
    write_diffusers_config(d / "config", cfg)
    ours = Pipeline.load(str(ckpt), device="cpu", dtype="fp32", log=lambda *_: None)
    ref = diffusers_from_single_file(ckpt, d / "config")
    ref.set_progress_bar_config(disable=True)
    ref.sd_scheduler_config = ref.scheduler.config     # the file's own; tests build each scheduler from it
    return ours, ref


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return _build(tmp_path_factory, SMALL_SD1, seed=1)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return _build(tmp_path_factory, SMALL_SD2, seed=2)


def _np(images):
    return np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])


def _diffusers(ref, scheduler_cls, prompt, negative, steps, cfg, seed, size, **scheduler_kwargs):
    ref.scheduler = scheduler_cls.from_config(ref.sd_scheduler_config, **scheduler_kwargs)
    out = ref(prompt, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=cfg,
              generator=torch.Generator().manual_seed(seed), width=size, height=size, output_type="np")
    return out.images


# (sampler, schedule, diffusers scheduler class name, its options): diffusers' SD config uses steps_offset=1
DIFFUSERS_CASES = [
    ("euler", "linspace", "EulerDiscreteScheduler", dict(timestep_spacing="linspace")),
    ("euler", "leading", "EulerDiscreteScheduler", dict(timestep_spacing="leading")),
    ("euler_a", "leading", "EulerAncestralDiscreteScheduler", dict(timestep_spacing="leading")),
    # SD's scheduler_config.json says clip_sample: false; DDIMScheduler's own default would clip x0 to [-1, 1]
    ("ddim", "leading", "DDIMScheduler", dict(timestep_spacing="leading", clip_sample=False)),
    ("heun", "leading", "HeunDiscreteScheduler", dict(timestep_spacing="leading")),
    ("dpm2_a", "leading", "KDPM2AncestralDiscreteScheduler", dict(timestep_spacing="leading")),
    ("euler", "trailing karras", "EulerDiscreteScheduler", dict(timestep_spacing="trailing", use_karras_sigmas=True)),
    # UniPC's "trailing" timesteps are the Euler family's (its "leading" has n + 1 partitions, which no schedule
    # here names; see test_samplers' unipc-leading)
    ("unipc", "trailing", "UniPCMultistepScheduler", dict(timestep_spacing="trailing")),
]


@pytest.mark.parametrize("model", ["sd1", "sd2"])
@pytest.mark.parametrize("sampler,schedule,scheduler,options", DIFFUSERS_CASES,
                         ids=[f"{c[0]}-{c[1].replace(' ', '-')}" for c in DIFFUSERS_CASES])
def test_txt2img_equals_diffusers_pipeline(request, model, sampler, schedule, scheduler, options):
    import diffusers
    ours, ref = request.getfixturevalue(model)
    negative = NEG if sampler in ("euler", "heun", "ddim") else ""      # with and without a negative prompt
    kw = dict(steps=5, cfg=7.5, seed=7, size=32)
    mine = ours.generate(PROMPT, negative, kw["steps"], kw["cfg"], sampler, schedule, seed=kw["seed"],
                         width=kw["size"], height=kw["size"]).images
    theirs = _diffusers(ref, getattr(diffusers, scheduler), PROMPT, negative, **kw, **options)
    err = np.abs(_np(mine) - theirs).max()
    print(f"[parity] max abs pixel error {err:.5f}, image std {theirs.std():.3f}")
    assert err <= TOL, f"max abs pixel error {err:.4f} (image std {theirs.std():.3f})"


def _k_diffusion(ref, cfg, sampler, schedule, prompt, negative, steps, scale, seed, size):
    """diffusers' U-Net, text encoder and VAE driven by k-diffusion's sampler, with the pipeline's noise order."""
    import k_diffusion as K

    class Eps(torch.nn.Module):       # k-diffusion's wrappers call inner_model(x, t, **extra)
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, x, t, cond):
            return self.unet(x, t, encoder_hidden_states=cond).sample

    ac = ref.scheduler.alphas_cumprod
    wrap = K.external.DiscreteVDDPMDenoiser if cfg.prediction == "v" else K.external.DiscreteEpsDDPMDenoiser
    denoiser = wrap(Eps(ref.unet), ac, quantize=False)
    cond, uncond = ref.encode_prompt(prompt, "cpu", 1, True, negative)

    def guided(x, sigma):
        u, c = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([uncond, cond])).chunk(2)
        return u + scale * (c - u)

    if schedule == "karras":
        sigmas = K.sampling.get_sigmas_karras(steps, denoiser.sigma_min.item(), denoiser.sigma_max.item())
    else:
        sigmas = denoiser.get_sigmas(steps)
    g = torch.Generator().manual_seed(seed)
    shape = (1, 4, size // ref.vae_scale_factor, size // ref.vae_scale_factor)
    x = torch.randn(shape, generator=g) * sigmas[0]
    fn = {"dpmpp_2m": K.sampling.sample_dpmpp_2m, "dpmpp_2s_a": K.sampling.sample_dpmpp_2s_ancestral,
          "euler_a": K.sampling.sample_euler_ancestral, "lms": K.sampling.sample_lms,
          "dpmpp_3m_sde": K.sampling.sample_dpmpp_3m_sde}[sampler]
    extra = {} if sampler in ("dpmpp_2m", "lms") else {"noise_sampler": lambda s, t: torch.randn(shape, generator=g)}
    if sampler == "dpmpp_3m_sde":     # A1111's noise: a Brownian tree seeded with the image's seed
        extra = {"noise_sampler": K.sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(),
                                                                        seed=seed)}
    with torch.no_grad():
        x = fn(guided, x, sigmas, disable=True, **extra)
        image = ref.vae.decode(x / ref.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


K_CASES = [("dpmpp_2m", "karras", "sd1"), ("dpmpp_2s_a", "discrete", "sd2"), ("euler_a", "karras", "sd1"),
           ("dpmpp_2s_a", "karras", "sd1"), ("lms", "discrete", "sd2"), ("dpmpp_3m_sde", "karras", "sd1"),
           ("dpmpp_3m_sde", "discrete", "sd2")]


@pytest.mark.parametrize("sampler,schedule,model", K_CASES, ids=["-".join(c) for c in K_CASES])
def test_txt2img_equals_k_diffusion_on_diffusers_networks(request, sampler, schedule, model):
    ours, ref = request.getfixturevalue(model)
    cfg = ours.model.config
    negative = NEG if model == "sd1" else ""
    mine = ours.generate(PROMPT, negative, 6, 5.0, sampler, schedule, seed=11, width=32, height=32).images
    theirs = _k_diffusion(ref, cfg, sampler, schedule, PROMPT, negative, 6, 5.0, 11, 32)
    err = np.abs(_np(mine) - theirs).max()
    print(f"[parity] max abs pixel error {err:.5f}, image std {theirs.std():.3f}")
    assert err <= TOL, f"max abs pixel error {err:.4f} (image std {theirs.std():.3f})"


def test_parity_can_fail(sd1):
    """The comparisons above would notice a different seed or one step more."""
    import diffusers
    ours, ref = sd1
    theirs = _diffusers(ref, diffusers.EulerDiscreteScheduler, PROMPT, "", 5, 7.5, 7, 32, timestep_spacing="linspace")
    other_seed = ours.generate(PROMPT, "", 5, 7.5, "euler", "linspace", seed=8, width=32, height=32).images
    other_steps = ours.generate(PROMPT, "", 6, 7.5, "euler", "linspace", seed=7, width=32, height=32).images
    assert np.abs(_np(other_seed) - theirs).max() > 10 * TOL
    assert np.abs(_np(other_steps) - theirs).max() > 2 * TOL


# ---------------------------------------------------------------------------------------------------------------
# img2img


def _init_image(size=32, mode="RGB"):
    rng = np.random.default_rng(0)
    a = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    return Image.fromarray(a).convert(mode)


@pytest.mark.parametrize("model,sampler,schedule,scheduler,strength", [
    ("sd1", "euler", "leading", "EulerDiscreteScheduler", 0.6),
    ("sd2", "ddim", "leading", "DDIMScheduler", 0.5),
    ("sd1", "euler_a", "leading", "EulerAncestralDiscreteScheduler", 0.8),
    # strength 1: diffusers still mixes the init latent in at the first sigma (x = x0 + sigma_0 noise)
    ("sd1", "euler", "leading", "EulerDiscreteScheduler", 1.0),
    ("sd2", "ddim", "leading", "DDIMScheduler", 1.0),
    # LCMScheduler cuts its 4 timesteps (999, 759, 499, 259) to the last 2, as plan.last does
    ("sd1", "lcm", "lcm", "LCMScheduler", 0.5),
])
def test_img2img_equals_diffusers(request, model, sampler, schedule, scheduler, strength):
    import diffusers
    ours, ref = request.getfixturevalue(model)
    init = _init_image()
    mine = ours.img2img(PROMPT, init, strength, NEG, steps=10, cfg=7.5, sampler=sampler, schedule=schedule,
                        seed=5).images
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(ref.sd_scheduler_config, timestep_spacing="leading",
                                                               clip_sample=False)
    theirs = pipe(PROMPT, image=init, strength=strength, negative_prompt=NEG, num_inference_steps=10,
                  guidance_scale=7.5, generator=torch.Generator().manual_seed(5), output_type="np").images
    err = np.abs(_np(mine) - theirs).max()
    print(f"[parity] max abs pixel error {err:.5f}, image std {theirs.std():.3f}")
    assert err <= TOL, f"max abs pixel error {err:.4f} (image std {theirs.std():.3f})"


def test_img2img_strength_zero_returns_the_input_and_one_still_starts_from_it(sd1):
    ours, _ = sd1
    init = _init_image()
    same = ours.img2img(PROMPT, init, 0.0, steps=10, seed=1).images[0]
    assert np.array_equal(np.asarray(same), np.asarray(init))
    # 0.05 x 10 steps rounds down to zero steps too (diffusers' int(steps * strength)), not a crash
    assert np.array_equal(np.asarray(ours.img2img(PROMPT, init, 0.05, steps=10, seed=1).images[0]), np.asarray(init))
    # strength 1 runs every step, from x0 + sigma_0 * noise (diffusers' arithmetic), not from pure noise
    full = ours.img2img(PROMPT, init, 1.0, steps=4, sampler="euler", seed=3).latents
    txt = ours.generate(PROMPT, steps=4, sampler="euler", seed=3, width=32, height=32).latents
    assert not torch.equal(full, txt)


def test_img2img_accepts_any_mode_and_resizes_to_a_multiple_of_the_vae_factor(sd1):
    ours, _ = sd1
    logs = []
    ours.log = logs.append
    for mode in ("RGBA", "L", "P"):
        out = ours.img2img(PROMPT, _init_image(mode=mode), 0.5, steps=2, seed=1).images[0]
        assert out.size == (32, 32) and out.mode == "RGB"
    odd = _init_image(37)
    out = ours.img2img(PROMPT, odd, 0.5, steps=2, seed=1).images[0]
    assert out.size == (36, 36)           # the small test VAE downsamples by 2; SD's by 8
    assert any("resized to 36x36" in m for m in logs)


# ---------------------------------------------------------------------------------------------------------------
# prompts and errors


def test_unet_takes_odd_latent_sizes_like_diffusers(sd1):
    """A side that is odd on the way down (SD at 520 px: 65 latents) comes back to the skip's size on the way up,
    as diffusers' upsample_size does; LDM's fixed 2x upsampling would fail to concatenate."""
    ours, ref = sd1
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 9, 7, generator=g), torch.randn(2, 77, 64, generator=g)
    t = torch.tensor([999.0, 321.5])
    with torch.no_grad():
        mine = ours.model.unet(x, t, ctx)
        theirs = ref.unet(x, t, encoder_hidden_states=ctx).sample
    assert mine.shape == (2, 4, 9, 7)
    assert (mine - theirs).abs().max() <= 1e-4 * theirs.std()       # fp32, same tolerance as the U-Net tests


def test_long_prompts_are_chunked_and_short_ones_are_one_chunk(sd1):
    ours, _ = sd1
    short_c, short_u = ours.encode_prompts(PROMPT, "")
    assert short_c.shape[1] == 77 and short_u.shape[1] == 77
    long_prompt = ", ".join(["a very detailed red circle on a deep blue background"] * 12)   # ~130 tokens
    c, u = ours.encode_prompts(long_prompt, "blurry")
    assert c.shape[1] == 2 * 77 and u.shape[1] == 2 * 77          # the negative is padded to as many chunks
    mine = ours.generate(long_prompt, steps=2, seed=1, width=32, height=32).images[0]
    truncated = ours.generate(" ".join(long_prompt.split()[:60]), steps=2, seed=1, width=32, height=32).images[0]
    assert not np.array_equal(np.asarray(mine), np.asarray(truncated))


def test_emphasis_changes_the_context_only_when_enabled(sd1):
    ours, _ = sd1
    plain, _ = ours.encode_prompts("a (red:1.5) circle", "", emphasis=False)
    weighted, _ = ours.encode_prompts("a (red:1.5) circle", "", emphasis=True)
    unweighted, _ = ours.encode_prompts("a red circle", "", emphasis=True)
    same, _ = ours.encode_prompts("a red circle", "", emphasis=False)
    assert torch.equal(unweighted, same)
    assert not torch.allclose(weighted, unweighted)
    assert not torch.equal(plain, unweighted)        # without emphasis the brackets are just text


@pytest.mark.parametrize("kwargs,message", [
    (dict(width=33, height=32), "multiple of 2"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(sampler="euler b"), "unknown sampler"),
    (dict(schedule="cosine"), "unknown schedule"),
    (dict(cfg=-1.0), "cfg must be >= 0"),
])
def test_bad_generate_arguments_give_clear_errors(sd1, kwargs, message):
    ours, _ = sd1
    args = dict(steps=2, seed=1, width=32, height=32)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ours.generate(PROMPT, **args)


def test_strength_out_of_range_is_a_clear_error(sd1):
    ours, _ = sd1
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        ours.img2img(PROMPT, _init_image(), 1.5)


# ---------------------------------------------------------------------------------------------------------------
# batches: diffusers' (one prompt, one seed, batch=B) and A1111's (one seed per image)


def test_a_batch_of_one_seed_is_diffusers_batch(sd1):
    """generate(prompt, seed=s, batch=2): one generator draws both images, as diffusers' num_images_per_prompt."""
    ours, ref = sd1
    mine = ours.generate(PROMPT, NEG, 4, 7.5, "euler_a", "leading", seed=5, width=32, height=32, batch=2).images
    ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(ref.sd_scheduler_config,
                                                                          timestep_spacing="leading")
    theirs = ref(PROMPT, negative_prompt=NEG, num_inference_steps=4, guidance_scale=7.5, num_images_per_prompt=2,
                 generator=torch.Generator().manual_seed(5), width=32, height=32, output_type="np").images
    assert np.abs(_np(mine) - theirs).max() <= TOL
    # and the comparison can fail: the second image is not the first (nor seed 5's image alone)
    assert np.abs(theirs[1] - theirs[0]).max() > 10 * TOL


TINY_PROMPTS = [shapes.caption("red", "circle", "blue"), shapes.caption("white", "square", "green"),
                shapes.caption("black", "triangle", "yellow")]


@pytest.fixture(scope="module")
def tiny():
    return Pipeline.load(None, log=lambda *_: None)


def pixels(image):
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_a", "dpmpp_sde"])
def test_a_batched_image_equals_the_same_prompt_and_seed_generated_alone(tiny, sampler):
    # deterministic, ancestral (fresh noise from each image's generator) and SDE (each image's Brownian tree)
    pipe = tiny
    batch = pipe.generate(TINY_PROMPTS, seed=[7, 8, 9], steps=4, sampler=sampler).images
    alone = [pipe.generate(p, seed=s, steps=4, sampler=sampler).images[0] for p, s in zip(TINY_PROMPTS, [7, 8, 9])]
    for a, b in zip(batch, alone):
        # a batched U-Net call rounds differently in the last bits: at most one level of 255 after decoding
        assert np.abs(pixels(a) - pixels(b)).max() <= 1
    # and the comparison can fail: another seed gives another image
    other = pipe.generate(TINY_PROMPTS[0], seed=10, steps=4, sampler=sampler).images[0]
    assert np.abs(pixels(batch[0]) - pixels(other)).max() > 10


def random_lora(path, seed=3):
    """A kohya LoRA file for the tiny model, large enough to change its images."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for name, layer in lora.targets(TINY, "default").items():
        out_f, in_f, *k = layer.shape
        down = torch.randn(4, in_f, *k, generator=g) / (in_f * int(np.prod(k or [1]))) ** 0.5
        factors[name] = lora.Factors(down, torch.randn(out_f, 4, *[1] * len(k), generator=g), 2.0)
    lora.save_kohya(path, factors)
    return path


def test_a_batch_mixing_lora_tags_equals_each_prompt_generated_alone(tiny, tmp_path):
    pipe = tiny
    random_lora(tmp_path / "odd.safetensors")
    pipe.lora_dir = str(tmp_path)
    try:
        prompts = [TINY_PROMPTS[0], TINY_PROMPTS[1] + " <lora:odd:0.8>", TINY_PROMPTS[2]]
        batch = pipe.generate(prompts, seed=[7, 8, 9], steps=4).images
        alone = [pipe.generate(p, seed=s, steps=4).images[0] for p, s in zip(prompts, [7, 8, 9])]
        for a, b in zip(batch, alone):
            assert np.abs(pixels(a) - pixels(b)).max() <= 1
        untagged = pipe.generate(TINY_PROMPTS[1], seed=8, steps=4).images[0]
        assert np.abs(pixels(batch[1]) - pixels(untagged)).max() > 10      # the LoRA did change that image
    finally:
        pipe.lora_dir = None
        pipe.set_loras([])


def test_a_batch_mixing_prompt_lengths_equals_each_prompt_generated_alone(tiny):
    long_prompt = TINY_PROMPTS[1] + ", highly detailed" * 30             # over 75 tokens: two chunks of context
    prompts = [TINY_PROMPTS[0], long_prompt]
    batch = tiny.generate(prompts, seed=[7, 8], steps=3).images
    alone = [tiny.generate(p, seed=s, steps=3).images[0] for p, s in zip(prompts, [7, 8])]
    for a, b in zip(batch, alone):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1
    assert np.abs(pixels(batch[0]) - pixels(batch[1])).max() > 10         # two different images


def test_one_prompt_with_a_list_of_seeds_and_bad_pairings(tiny):
    batch = tiny.generate(TINY_PROMPTS[0], seed=[7, 8], steps=3)
    assert batch.seeds == [7, 8] and len(batch.images) == 2
    alone = tiny.generate(TINY_PROMPTS[0], seed=8, steps=3).images[0]
    assert np.abs(pixels(batch.images[1]) - pixels(alone)).max() <= 1
    with pytest.raises(ValueError, match="one seed per prompt"):
        tiny.generate(TINY_PROMPTS, seed=[7, 8], steps=3)
    with pytest.raises(ValueError, match="needs a list of seeds"):
        tiny.generate(TINY_PROMPTS, seed=7, steps=3)
    with pytest.raises(ValueError, match="batch is for one prompt and one seed"):
        tiny.generate(TINY_PROMPTS[0], seed=[7, 8], steps=3, batch=2)


# ---------------------------------------------------------------------------------------------------------------
# full-size configurations (the real SD 1.5 and SD 2.1-v networks) at 64x64 pixels


@pytest.mark.parametrize("preset", ["SD15", "SD21_V"])
def test_full_size_txt2img_equals_diffusers(tmp_path, preset):
    import gc

    import diffusers

    import minisd.config
    cfg = getattr(minisd.config, preset)
    ckpt = tmp_path / "model.safetensors"
    # fp16 storage halves the file (2.1 / 2.6 GB); both libraries load it into fp32
    write_ldm_checkpoint(ckpt, cfg, seed=4, dtype=torch.float16, parameterization=cfg.prediction)
    write_diffusers_config(tmp_path / "config", cfg)
    torch.set_num_threads(2)          # big matmuls do use the second core
    ours = Pipeline.load(str(ckpt), device="cpu", dtype="fp32", log=lambda *_: None)
    mine = ours.generate(PROMPT, NEG, 3, 7.5, "euler", "leading", seed=9, width=64, height=64).images
    del ours
    gc.collect()
    ref = diffusers_from_single_file(ckpt, tmp_path / "config", torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config, timestep_spacing="leading")
    theirs = ref(PROMPT, negative_prompt=NEG, num_inference_steps=3, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(9), width=64, height=64, output_type="np").images
    torch.set_num_threads(1)
    err = np.abs(_np(mine) - theirs).max()
    print(f"[parity] max abs pixel error {err:.5f}, image std {theirs.std():.3f}")
    assert theirs.std() > 0.05, "a saturated or flat image would make the comparison meaningless"
    assert err <= TOL, f"max abs pixel error {err:.4f} (image std {theirs.std():.3f})"


# ---------------------------------------------------------------------------------------------------------------
# LCM with an LCM-LoRA: diffusers' LCMScheduler + load_lora_weights, 4 steps, no guidance


# every layer latent-consistency/lcm-lora-sdv1-5 changes (its adapter_config's target_modules): the attention and
# feed-forward Linears, proj_in/out, and the ResNet blocks' 3x3 convs, shortcuts, time projections and resamplers
LCM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


def lcm_lora_file(ref, folder, layout, rank=4, alpha=8.0):
    """A random LoRA of the U-Net on LCM-LoRA's layers, made by peft (an adapter on a copy of diffusers' U-Net,
    factors redrawn) and written by diffusers' save_lora_weights ("peft": unet.<module>.lora_A.weight, alpha in
    the header's lora_adapter_metadata), or the same factors under the kohya keys A1111 and ComfyUI read
    ("kohya": lora_unet_<module with _>.lora_down.weight, .lora_up.weight, .alpha)."""
    import copy

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    unet = copy.deepcopy(ref.unet)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=LCM_LORA_TARGETS, init_lora_weights=False)
    unet.add_adapter(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:       # down ~ 1/sqrt(fan_in), up ~ 0.2/sqrt(rank): a visible change, not a blow-up
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (0.2 if "lora_B" in name else 1.0) / fan_in ** 0.5)
    state = get_peft_model_state_dict(unet)
    if layout == "peft":
        diffusers.StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state,
                                                            unet_lora_adapter_metadata=config.to_dict())
        return folder / "pytorch_lora_weights.safetensors"
    tensors = {}
    for key, t in state.items():
        module, part = key.rsplit(".lora_", 1)
        kohya = "lora_unet_" + module.replace(".", "_")
        tensors[f"{kohya}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = t.contiguous()
        tensors[f"{kohya}.alpha"] = torch.tensor(alpha)
    save_file(tensors, folder / "lcm_lora_kohya.safetensors")
    return folder / "lcm_lora_kohya.safetensors"


@pytest.mark.parametrize("layout,fuse", [("peft", False), ("peft", True), ("kohya", False)])
def test_lcm_with_an_lcm_lora_equals_diffusers(sd1, tmp_path, layout, fuse):
    ours, ref = sd1
    path = lcm_lora_file(ref, tmp_path, layout)
    kw = dict(steps=4, cfg=1.0, seed=7, size=32)
    ours.set_loras([(str(path), 1.0)])
    try:
        mine = ours.generate(PROMPT, "", kw["steps"], kw["cfg"], "LCM", seed=kw["seed"], width=32, height=32).images
    finally:
        ours.set_loras([])
    plain = ours.generate(PROMPT, "", kw["steps"], kw["cfg"], "LCM", seed=kw["seed"], width=32, height=32).images
    ref.load_lora_weights(str(path.parent), weight_name=path.name)
    try:
        if fuse:
            ref.fuse_lora()
        theirs = _diffusers(ref, diffusers.LCMScheduler, PROMPT, "", **kw)
    finally:
        if fuse:
            ref.unfuse_lora()
        ref.unload_lora_weights()
    err = np.abs(_np(mine) - theirs).max()
    print(f"[parity] max abs pixel error {err:.5f}, image std {theirs.std():.3f}")
    assert err <= TOL, f"max abs pixel error {err:.4f} (image std {theirs.std():.3f})"
    assert np.abs(_np(plain) - theirs).max() > 10 * TOL         # the LoRA changed the image: it was applied
