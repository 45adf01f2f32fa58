"""txt2img and img2img: the whole of Stable Diffusion in two short functions.

    pipe = Pipeline.load("v1-5-pruned-emaonly.safetensors")            # or a diffusers folder, "sd15", None = tiny
    images = pipe.generate("a red circle on a blue background", seed=1)
    images = pipe.img2img("a watercolour of a fox", init_image=Image.open("fox.png"), strength=0.6, seed=1)

The steps, each in the module that explains it:
  prompt -> tokens -> context            prompts.py (chunks, emphasis), tokenizer.py, clip.py
  seed -> initial latents (CPU randn)    samplers.noise_from: the same numbers on every device, and as diffusers
  latents -> denoised latents            samplers.py over diffusion.make_denoiser + diffusion.cfg_denoiser
  latents -> pixels                      vae.py

Noise convention (shared with samplers.py): one CPU torch.Generator seeded with `seed` draws, in this order,
the VAE posterior sample (img2img only), the initial noise randn(B, 4, H/8, W/8), then every fresh-noise draw of
an ancestral sampler. That is diffusers' order, so the same seed gives the same image as diffusers.
"""
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from . import diffusion, onednn, samplers
from .prompts import apply_emphasis, prompt_pair_tokens

DEFAULT_SAMPLER = "dpmpp_2m"        # A1111's default since 1.6 ("DPM++ 2M" with the Karras schedule)
DEFAULT_SCHEDULE = {"ddim": "leading", "ddpm": "leading"}     # SD's own DDIM/DDPM timesteps; others: karras
DEFAULT_STEPS = 20
DEFAULT_CFG = 7.5


def pick_device(device="auto"):
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cuda", "cpu", "mps") and not str(device).startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; valid: auto, cuda, cpu, mps")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU (torch.cuda.is_available() "
                         "is False)")
    return torch.device(device)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_dtype(dtype, device):
    """auto: fp16 on CUDA (as diffusers users run SD), fp32 elsewhere (fp16 matmuls are slow or missing on CPU)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_schedule(sampler, schedule=None):
    """(sampler key, schedule) from a sampler name that may carry A1111's " Karras" suffix and an explicit
    --schedule ("default" or None picks the sampler's default)."""
    key, from_name = samplers.parse_sampler(sampler)
    if schedule in (None, "default"):
        schedule = from_name or DEFAULT_SCHEDULE.get(key, "karras")
    elif from_name and from_name not in schedule.split():
        raise ValueError(f"sampler {sampler!r} asks for the {from_name} schedule but --schedule is {schedule!r}")
    return key, schedule


def starts_variance_preserving(key, schedule):
    """Whether the initial latent is randn * sqrt(sigma_0^2 + 1) rather than randn * sigma_0.

    k-diffusion and A1111 start at x = sigma_max * randn. diffusers starts DDIM / DDPM at x_T = randn in the
    variance-preserving space (sqrt(sigma^2 + 1) in sigma space), and its Euler-family schedulers do the same
    with "leading" timesteps (`init_noise_sigma`). Following both keeps the same-seed-same-image promise."""
    return key in ("ddim", "ddpm") or schedule.split()[0] == "leading"


def to_pil(images):
    """(B, 3, H, W) in [-1, 1] -> PIL images, rounding as diffusers does."""
    images = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in (images * 255).round().astype("uint8")]


def from_pil(image, multiple=8, log=print):
    """PIL image of any mode -> (1, 3, H, W) in [-1, 1], resized down to a multiple of `multiple` if needed."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"init_image must be a PIL image, got {type(image).__name__}")
    image = image.convert("RGB")           # RGBA, L, P, CMYK... -> RGB (alpha dropped, as diffusers does)
    w, h = image.size
    w8, h8 = w - w % multiple, h - h % multiple
    if w8 == 0 or h8 == 0:
        raise ValueError(f"init image is {w}x{h}; it must be at least {multiple}x{multiple}")
    if (w8, h8) != (w, h):
        log(f"init image {w}x{h} resized to {w8}x{h8} (a multiple of {multiple})")
        image = image.resize((w8, h8), Image.LANCZOS)      # diffusers' VaeImageProcessor does the same
    a = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a).permute(2, 0, 1)[None]


@dataclass
class Result:
    images: list            # PIL images
    latents: torch.Tensor   # the final latents (B, 4, H/8, W/8), before the VAE decoder
    seed: int
    sampler: str
    schedule: str


class CUDAGraphUNet:
    """The U-Net call of a sampling step, captured once as a CUDA graph and replayed at every step.

    In eager mode each step launches ~1,000 small kernels one by one from Python; on a fast GPU the GPU then waits
    for the CPU. A graph replays the whole recorded launch sequence at once. It reads its inputs from fixed
    buffers and writes a fixed output buffer, so each call copies x, t and context in (device-to-device, no
    sync) and the caller must use the output before the next call (the denoiser's arithmetic does). One graph
    per input shape; CUDA only (torch.cuda.graphs)."""

    def __init__(self, unet):
        self.unet = unet
        self.graphs = {}        # input shapes -> (graph, static inputs, static output)

    def __call__(self, x, t, context):
        key = (x.shape, x.dtype, context.shape)
        if key not in self.graphs:
            self.graphs[key] = self._capture(x, t, context)
        graph, inputs, out = self.graphs[key]
        for buffer, value in zip(inputs, (x, t, context)):
            buffer.copy_(value)
        graph.replay()
        return out

    def _capture(self, x, t, context):
        inputs = [v.clone() for v in (x, t, context)]
        # warm up on a side stream first: cuDNN/cuBLAS choose algorithms and torch.compile compiles outside the
        # capture (neither may happen while a graph is recorded)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.unet(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.unet(*inputs)
        return graph, inputs, out


class Pipeline:
    """A loaded model on a device, with generate() and img2img().

    Two optional fast paths for the U-Net call, the only heavy work of the sampling loop (both give the same
    images up to floating-point rounding; tests/test_fast_path.py):
      compile=True      torch.compile (TorchInductor fuses the elementwise ops and norms into fewer kernels)
      cuda_graph=True   record the call once as a CUDA graph and replay it every step (CUDAGraphUNet)
    and one for the CPU in fp32:
      prepack=True      the text encoder's and U-Net's conv and linear layers swapped for oneDNN ones with their
                        weights prepared once (minisd/onednn.py), at their first use. Inference only, and it
                        changes the model's modules in place, so it is on where the pipeline owns the model it
                        loaded (Pipeline.load) and off for a model handed in (which may be in training)
    """

    def __init__(self, model, device="cpu", dtype=torch.float32, name=None, log=print, progress=False,
                 compile=False, cuda_graph=False, prepack=False):
        self.device = pick_device(device) if isinstance(device, str) else device
        self.dtype = pick_dtype(dtype, self.device) if not isinstance(dtype, torch.dtype) else dtype
        # fp16 decoders overflow on SD 2.1 (black images): keep the VAE in fp32 then, as diffusers' force_upcast
        self.vae_dtype = torch.float32 if self.dtype == torch.float16 else self.dtype
        self.model = model.eval()
        onednn.restore(model.text_encoder)     # in case an earlier Pipeline prepared them: .to() needs plain layers
        onednn.restore(model.unet)
        model.text_encoder.to(self.device, self.dtype)
        model.unet.to(self.device, self.dtype)
        model.vae.to(self.device, self.vae_dtype)
        if self.device.type == "cuda":
            # NHWC is the layout the tensor cores' convolution kernels want (no transposes around each conv)
            self.model.unet.to(memory_format=torch.channels_last)
        # what each network gets at its first use (see vae() and unet()): done then and not at load, since
        # loading leaves the weights mapped from the file until they are first read
        self._at_first_use = {}
        if self.device.type == "cpu":
            self._at_first_use["vae"] = lambda vae: vae.to(memory_format=torch.channels_last)
            if prepack and self.dtype == torch.float32 and not compile:
                self._at_first_use["text_encoder"] = self._at_first_use["unet"] = onednn.prepare
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, got {self.device}")
        self.unet_call = self.model.unet
        if compile:
            self.unet_call = torch.compile(self.unet_call)
        if cuda_graph:
            self.unet_call = CUDAGraphUNet(self.unet_call)
        self.name = name or model.config.name
        self.log = log
        self.progress = progress        # a tqdm bar over the sampling steps (the CLI turns it on)
        self.vae_tile = None            # latent tile size for a tiled VAE decode (None: decode in one piece)
        cfg = model.config
        betas = diffusion.scaled_linear_betas(cfg.beta_start, cfg.beta_end, cfg.num_timesteps)
        self.alphas_cumprod = diffusion.alphas_cumprod_from_betas(betas)
        self.sigmas_train = diffusion.sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self.factor = 2 ** (len(cfg.vae.ch_mult) - 1)     # pixels per latent, 8 for SD

    @classmethod
    def load(cls, model=None, prediction=None, device="auto", dtype="auto", log=print, progress=False,
             compile=False, cuda_graph=False, prepack=True):
        """model: a checkpoint path or diffusers folder, a named model ("sd15", "sd21", "sd21-base"), or None for
        the tiny built-in one. prediction: None/"auto" (detected), "eps" or "v". prepack: see the class."""
        from . import download
        from .model import load_model
        if prediction == "auto":
            prediction = None
        if model is None:
            from .tiny import tiny_model_path
            model, name = tiny_model_path(), "minisd-tiny"
            log(f"no --model given: using the tiny built-in model ({model})")
        elif model in download.MODELS:
            name = model
            model = download.fetch_model(model)
        else:     # A1111 names a model by its file name without the extension
            path = Path(model)
            name = path.name if path.is_dir() else path.stem
        device = pick_device(device)
        dtype = pick_dtype(dtype, device)
        sd = load_model(model, prediction=prediction, dtype=torch.float32, device="cpu", log=log)
        return cls(sd, device, dtype, name=name, log=log, progress=progress, compile=compile, cuda_graph=cuda_graph,
                   prepack=prepack)

    # -- text ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompt, negative_prompt="", emphasis=False):
        """(cond, uncond) contexts, each (1, n * 77, width); n > 1 for prompts longer than 75 tokens."""
        c_ids, c_w, u_ids, u_w = prompt_pair_tokens(self.model.tokenizer, prompt, negative_prompt, emphasis)
        # one pass per prompt (as diffusers does): half the working memory of one batch of both, at the same speed
        encoder = self.text_encoder()
        z = torch.cat([encoder(ids.to(self.device)) for ids in (c_ids, u_ids)])   # (2n, 77, width)
        z = apply_emphasis(z, torch.cat([c_w, u_w]).to(self.device))
        cond, uncond = z.chunk(2)
        return cond.reshape(1, -1, z.shape[-1]), uncond.reshape(1, -1, z.shape[-1])

    # -- the loop -----------------------------------------------------------------------------------------

    def sigmas(self, schedule, steps, key):
        # SD's DDIM (set_alpha_to_one=False) ends its last step at abar_0, i.e. at sigma_min rather than 0
        final = "sigma_min" if key == "ddim" else "zero"
        return samplers.get_sigmas(schedule, steps, self.sigmas_train, final=final)

    def _denoiser(self, cond, uncond, cfg, schedule, batch, rescale=0.0, sigmas=None):
        self.unet()     # prepared at first use (prepack); self.unet_call calls the same module
        spacing = schedule.split()[0]
        # diffusers interpolates sigma -> t linearly; k-diffusion in log sigma. Only fractional t tells them apart.
        interpolation = "linear" if spacing in ("linspace", "leading", "trailing") else "log"
        denoise = diffusion.make_denoiser(self.unet_call, self.alphas_cumprod, self.model.config.prediction,
                                          interpolation, sigmas=sigmas, device=self.device, dtype=self.dtype)
        cond, uncond = cond.expand(batch, -1, -1), uncond.expand(batch, -1, -1)
        return diffusion.cfg_denoiser(denoise, cond, uncond, scale=cfg, rescale=rescale)

    def _check(self, steps, cfg, width, height, batch):
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if cfg < 0:
            raise ValueError(f"cfg must be >= 0, got {cfg}")
        f = self.factor
        for name, v in (("width", width), ("height", height)):
            if not isinstance(v, int) or v < f or v % f:
                raise ValueError(f"{name} must be a positive multiple of {f} (the VAE downsamples by {f}), "
                                 f"got {v!r}")
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")

    @torch.no_grad()
    def _sample(self, x, sigmas, key, cond, uncond, cfg, schedule, generator, eta, callback, rescale):
        # the per-step constants go to the device here, before the loop (see diffusion.make_denoiser), and the
        # samplers get the sigmas as Python floats: no step reads anything back from a tensor
        denoise = self._denoiser(cond, uncond, cfg, schedule, x.shape[0], rescale, sigmas)
        noise = samplers.noise_from(generator, tuple(x.shape), self.device, self.dtype)
        # a tqdm bar over the steps (a no-op unless self.progress); the samplers call back once per step
        bar = tqdm(total=len(sigmas) - 1, desc=key, unit="step", disable=not self.progress)

        def counted(i, x, denoised, sigma):
            bar.update(1)
            if callback:
                callback(i, x, denoised, sigma)
        with bar:
            return samplers.sample(key, denoise, x, sigmas.tolist(), noise=noise, eta=eta, callback=counted)

    def set_memory_options(self, attention_slice=None, vae_tile=None):
        """Trade speed for memory: attention computed `attention_slice` queries at a time (exactly the same
        result), and the VAE decoding `vae_tile` x `vae_tile` latent tiles with blended seams (approximately)."""
        self.model.unet.set_attention_slicing(attention_slice)
        self.model.vae.set_attention_slicing(attention_slice)
        self.vae_tile = vae_tile
        if isinstance(self.unet_call, CUDAGraphUNet):
            self.unet_call.graphs.clear()       # recorded with the old options: record again at the next call

    def _ready(self, name):
        net = getattr(self.model, name)
        first_use = self._at_first_use.pop(name, None)
        if first_use:
            first_use(net)
        return net

    def text_encoder(self):
        """The text encoder; with prepack, its linear layers swapped for oneDNN ones at first use (see unet())."""
        return self._ready("text_encoder")

    def unet(self):
        """The U-Net; with prepack (CPU, fp32), its conv weights reordered once into oneDNN's blocked layout and
        its linear layers run by oneDNN, at first use (minisd/onednn.py: on the CPU every plain conv call copies
        its weight into that layout first; at 256 px that copy costs more than the deep levels' convolutions)."""
        return self._ready("unet")

    def vae(self):
        """The VAE; on the CPU, its conv weights turned NHWC (channels_last) at first use.

        oneDNN's CPU convolutions read and write NHWC as it is, but reorder an NCHW map into a blocked layout and
        back around every conv: for the decoder's last levels at 512 px, a 256 MiB copy each way. NHWC decodes
        512 px in ~22% less memory and ~10% less time (measured, 1 thread). The U-Net keeps NCHW on the CPU: its
        maps are small and its time is in the weights (no gain measured); those are prepared instead (unet())."""
        return self._ready("vae")

    @torch.no_grad()
    def decode(self, latents):
        return self.vae().decode(latents.to(self.vae_dtype), tile=self.vae_tile)

    def decode_preview(self, latents):
        return to_pil(self.decode(latents))

    @torch.no_grad()
    def generate(self, prompt, negative_prompt="", steps=DEFAULT_STEPS, cfg=DEFAULT_CFG, sampler=DEFAULT_SAMPLER,
                 schedule=None, eta=None, seed=None, width=None, height=None, batch=1, emphasis=False,
                 callback=None, rescale=0.0) -> Result:
        """txt2img. seed None draws a random one (returned in the Result, and printed by the CLI)."""
        size = self.model.config.image_size
        width, height = width or size, height or size
        self._check(steps, cfg, width, height, batch)
        key, schedule = resolve_schedule(sampler, schedule)
        seed = random.randrange(2 ** 32) if seed is None else int(seed)
        generator = torch.Generator().manual_seed(seed)
        cond, uncond = self.encode_prompts(prompt, negative_prompt, emphasis)
        sigmas = self.sigmas(schedule, steps, key)
        shape = (batch, self.model.config.unet.in_channels, height // self.factor, width // self.factor)
        x = torch.randn(shape, generator=generator)                  # drawn on the CPU: device-independent
        sigma_0 = sigmas[0].item()
        x = x * samplers.init_noise_sigma(sigma_0, starts_variance_preserving(key, schedule))
        x = x.to(self.device, self.dtype)
        latents = self._sample(x, sigmas, key, cond, uncond, cfg, schedule, generator, eta, callback, rescale)
        return Result(to_pil(self.decode(latents)), latents, seed, key, schedule)

    @torch.no_grad()
    def img2img(self, prompt, init_image, strength=0.75, negative_prompt="", steps=DEFAULT_STEPS, cfg=DEFAULT_CFG,
                sampler=DEFAULT_SAMPLER, schedule=None, eta=None, seed=None, batch=1, emphasis=False,
                callback=None, rescale=0.0) -> Result:
        """img2img (SDEdit, Meng et al. 2022): encode the image, noise it to the level `strength` selects with the
        forward process, and run only the remaining steps.

        The arithmetic (diffusers' StableDiffusionImg2ImgPipeline, so the same seed gives the same image):
        `steps` sigmas are laid out as for txt2img, int(steps * strength) of them are run — the last ones — and
        the latent starts at the first of those: x = x0 + sigma_start * noise (the forward process in sigma
        space). strength 0 runs no step and returns the input; strength 1 is txt2img from pure noise.
        """
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        image = from_pil(init_image, self.factor, log=self.log)     # (1, 3, H, W)
        height, width = image.shape[-2:]
        self._check(steps, cfg, width, height, batch)
        key, schedule = resolve_schedule(sampler, schedule)
        seed = random.randrange(2 ** 32) if seed is None else int(seed)
        run = min(int(steps * strength), steps)
        if run == 0:
            self.log(f"strength {strength} x {steps} steps rounds to 0 steps: returning the input image")
            pil = to_pil(image)[0]
            return Result([pil] * batch, None, seed, key, schedule)
        if strength == 1.0:
            return self.generate(prompt, negative_prompt, steps, cfg, sampler, schedule, eta, seed, width, height,
                                 batch, emphasis, callback, rescale)
        generator = torch.Generator().manual_seed(seed)
        cond, uncond = self.encode_prompts(prompt, negative_prompt, emphasis)
        sigmas = self.sigmas(schedule, steps, key)[steps - run:]
        vae = self.vae()
        mean, logvar = vae.posterior(image.to(self.device, self.vae_dtype))
        eps = torch.randn(mean.shape, generator=generator)           # the posterior sample's draw, then ...
        x0 = (mean + torch.exp(0.5 * logvar) * eps.to(mean)) * vae.cfg.scale_factor
        x0 = x0.expand(batch, -1, -1, -1)                            # one encoding serves the batch (diffusers)
        noise = torch.randn(x0.shape, generator=generator)           # ... the forward-process noise
        x = diffusion.add_noise(x0.to(self.dtype), noise.to(self.device, self.dtype), sigmas[0].item())
        latents = self._sample(x, sigmas, key, cond, uncond, cfg, schedule, generator, eta, callback, rescale)
        return Result(to_pil(self.decode(latents)), latents, seed, key, schedule)
