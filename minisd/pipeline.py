"""txt2img, img2img and inpainting: the whole of Stable Diffusion in a few short functions.

    pipe = Pipeline.load("v1-5-pruned-emaonly.safetensors")            # or a diffusers folder, "sd15", None = tiny
    images = pipe.generate("a red circle on a blue background", seed=1)
    images = pipe.generate(["a red circle on a blue background", "a cat"], seed=[1, 2])   # one image per pair
    images = pipe.img2img("a watercolour of a fox", init_image=Image.open("fox.png"), strength=0.6, seed=1)
    images = pipe.inpaint("a red hat", init_image=Image.open("me.png"), mask=Image.open("hat.png"), seed=1)
    images = pipe.generate("a cat", seed=1, subseed=7, subseed_strength=0.2)    # a variation (variation.py)
    images = pipe.generate("a cat", seed=1, hires=hires.Hires(scale=2, strength=0.6))   # hires fix (hires.py)

The steps, each in the module that explains it:
  prompt -> tokens -> context            prompts.py (chunks, emphasis), tokenizer.py, clip.py
  seed -> initial latents (CPU randn)    samplers.noise_from: the same numbers on every device, and as diffusers
                                         (variation.py: bent toward a variation seed's)
  latents -> denoised latents            samplers.py over diffusion.make_denoiser + diffusion.cfg_denoiser
  latents -> pixels                      vae.py
  a second, larger pass (hires fix)      hires.py
  a mask around the loop (inpainting)    inpaint.py

Noise convention (shared with samplers.py): one CPU torch.Generator seeded with `seed` draws, in this order,
the VAE posterior sample (img2img and inpainting), the initial noise randn(B, 4, H/8, W/8), the masked image's
posterior sample (inpainting), then every fresh-noise draw of an ancestral sampler. That is diffusers' order, so the same seed gives the same image as diffusers. The SDE
samplers (dpmpp_sde, dpmpp_2m_sde) instead read their noise off a Brownian tree seeded with `seed`
(brownian.py), as k-diffusion and diffusers' DPMSolverSDEScheduler(noise_sampler_seed=seed) do.

Two kinds of batch follow from it. One prompt and one seed with batch=B is diffusers' batch: the one generator
draws all B images, so image b depends on B. A list of prompts and/or seeds is A1111's batch: one image per
(prompt, seed) pair, each with its own generator (and Brownian tree) drawing its share of every draw above, so each
image equals that prompt and seed generated alone (up to the rounding of a batched U-Net call), whatever else
shares its batch. `minisd generate --batch-size N` and `minisd eval` use the second.
"""
import contextlib
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from . import controlnet, diffusion, embeddings, fast, inpaint, lora, samplers, variation
from .devices import pick_device, pick_dtype
from .hires import LATENT_MODES, upscale_images, upscale_latents
from .images import from_pil, to_pil, to_tensor
from .model import load_model, locate
from .prompts import apply_emphasis, parse_lora_tags, prompt_pair_tokens

DEFAULT_SAMPLER = samplers.DEFAULT
DEFAULT_STEPS = 20
DEFAULT_CFG = 7.5


@dataclass
class Result:
    images: list            # PIL images
    latents: torch.Tensor   # the final latents (B, 4, H/8, W/8), before the VAE decoder
    seeds: list             # image b's seed (diffusers' batch: the one seed, once)
    sampler: str            # the sampler's key and the schedule it ran on
    schedule: str
    subseeds: list = None   # image b's variation seed (None: no variation)

    @property
    def seed(self):
        return self.seeds[0]


def _pairs(prompt, seed, batch):
    """(prompts, seeds, images per seed) of a generate call: one prompt and one seed (None: a random one) draw
    `batch` images from one generator; a list of prompts and/or seeds, one image per (prompt, seed) pair."""
    if isinstance(prompt, str) and not isinstance(seed, (list, tuple)):
        return [prompt], [random.randrange(2 ** 32) if seed is None else int(seed)], batch
    if batch != 1:
        raise ValueError(f"batch is for one prompt and one seed; a list of prompts or seeds is one image per pair "
                         f"(got batch={batch!r})")
    if isinstance(seed, (list, tuple)):
        seeds = [int(s) for s in seed]
    elif seed is None:
        seeds = [random.randrange(2 ** 32) for _ in prompt]
    else:
        raise ValueError("a list of prompts needs a list of seeds, one per prompt (or None for random ones)")
    prompts = [prompt] * len(seeds) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError(f"one seed per prompt: got {len(prompts)} prompts and {len(seeds)} seeds")
    return prompts, seeds, 1


class Pipeline:
    """A loaded model on a device, with generate() and img2img().

    Speed paths (minisd/fast/, each giving the same images up to floating-point rounding) are prepared once, here:
      compile=True      torch.compile the U-Net call
      cuda_graph=True   record the U-Net call once as a CUDA graph and replay it every step
      prepack=True      on the CPU in fp32, the U-Net's layers swapped for oneDNN ones with their weights prepared
                        once, if its own first calls measure that faster (fast.MeasuredChoice). Inference only, and it changes the model's modules in place,
                        so it is on where the pipeline owns the model it loaded (Pipeline.load) and off for a model
                        handed in (which may be in training)
    """

    def __init__(self, model, device="cpu", dtype=torch.float32, name=None, log=print, progress=False,
                 compile=False, cuda_graph=False, prepack=False):
        self.device = pick_device(device) if isinstance(device, str) else device
        self.dtype = pick_dtype(dtype, self.device)
        # fp16 decoders overflow on SD 2.1 (black images): keep the VAE in fp32 then, as diffusers' force_upcast
        self.vae_dtype = torch.float32 if self.dtype == torch.float16 else self.dtype
        self.model = fast.restore(model.eval())    # an earlier Pipeline may have prepared it: .to() needs plain layers
        model.text_encoder.to(self.device, self.dtype)
        model.unet.to(self.device, self.dtype)
        model.vae.to(self.device, self.vae_dtype)
        self.unet_call = fast.prepare(model, self.device, compile=compile, cuda_graph=cuda_graph,
                                      onednn_layers=prepack, log=log)
        self.name = name or model.config.name
        self.log = log
        self.progress = progress        # a tqdm bar over the sampling steps (the CLI turns it on)
        self.vae_tile = None            # latent tile size for a tiled VAE decode (None: decode in one piece)
        cfg = model.config
        betas = diffusion.scaled_linear_betas(cfg.beta_start, cfg.beta_end, cfg.num_timesteps)
        self.alphas_cumprod = diffusion.alphas_cumprod_from_betas(betas)
        self.sigmas_train = diffusion.sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self.factor = 2 ** (len(cfg.vae.ch_mult) - 1)     # pixels per latent, 8 for SD
        self.embeddings = embeddings.Embeddings(cfg.text)  # textual inversion words (load_embeddings)
        self.loras = []                 # [(LoRA, unet multiplier, text multiplier)] of set_loras
        self.lora_dir = None            # where a prompt's <lora:NAME:MULT> finds NAME.safetensors
        self._merged = ([], {})         # the LoRAs merged into the weights now, and the Parameters they replaced

    @classmethod
    def load(cls, model=None, prediction=None, device="auto", dtype="auto", log=print, progress=False,
             compile=False, cuda_graph=False, prepack=True):
        """model: a checkpoint path or diffusers folder, a named model ("sd15", "sd21", "sd21-base"), or None for
        the tiny built-in one. prediction: None/"auto" (detected), "eps" or "v". prepack: see the class."""
        path, name = locate(model, log)
        device = pick_device(device)
        sd = load_model(path, prediction=None if prediction == "auto" else prediction, dtype=torch.float32,
                        device="cpu", log=log)
        return cls(sd, device, pick_dtype(dtype, device), name=name, log=log, progress=progress, compile=compile,
                   cuda_graph=cuda_graph, prepack=prepack)

    def plan(self, sampler=DEFAULT_SAMPLER, schedule=None, steps=DEFAULT_STEPS, eta=None, churn=None):
        """The sampling plan (samplers.plan: the settings checked) for this model's noise schedule."""
        return samplers.plan(sampler, schedule, steps, self.sigmas_train, eta, churn)

    # -- textual inversion and LoRA ---------------------------------------------------------------------

    def load_embeddings(self, files=(), folder=None):
        """Textual-inversion files (each named as the file names it) and/or every file of an A1111 embeddings
        folder (named after their stems); see embeddings.py. Returns the words added."""
        words = [self.embeddings.load(f) for f in files]
        return words + (self.embeddings.load_folder(folder) if folder else [])

    def set_loras(self, loras):
        """Use these LoRAs from now on: [(file, multiplier)] or [(file, unet multiplier, text multiplier)]; []
        for none. Every file is read and checked against the model before any weight changes (lora.py)."""
        cfg = self.model.config
        self.loras = [(lora.read(f, cfg), m[0], m[-1]) for f, *m in loras]
        self._merge(self.loras)

    def _merge(self, loras):
        """Make `loras` the LoRAs merged into the weights: the previous ones are taken out (the original
        Parameters put back, bit for bit), the new ones merged in. A oneDNN-prepared network keeps its own copy of
        its conv weights, so it is restored to plain layers around the change and prepared again after."""
        if [(l.path, u, t) for l, u, t in loras] == [(l.path, u, t) for l, u, t in self._merged[0]]:
            return
        prepared = [net for net in (self.model.text_encoder, self.model.unet) if fast.onednn.is_prepared(net)]
        fast.restore(self.model)
        lora.restore(self.model, self._merged[1])
        self._merged = (list(loras), lora.apply(self.model, loras))
        for net in prepared:
            fast.onednn.prepare(net)
        if isinstance(self.unet_call, fast.CUDAGraphUNet):
            self.unet_call.graphs.clear()       # recorded with the old weights' memory: record again

    def _prompt_loras(self, prompt):
        """A1111's <lora:NAME:MULT> tags: cut out of the prompt, and NAME (a file in self.lora_dir) merged in
        beside set_loras' LoRAs, until a prompt names others. Returns the prompt without its tags."""
        prompt, tags = parse_lora_tags(prompt)
        if tags and self.lora_dir is None:
            raise ValueError(f"the prompt names <lora:{tags[0][0]}:...>, but no LoRA folder is set (--lora-dir)")
        found = [(lora.read(lora.find(self.lora_dir, name), self.model.config), unet, te)
                 for name, te, unet in tags]
        self._merge(self.loras + found)
        return prompt

    # -- text ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompt, negative_prompt="", emphasis=False, clip_skip=1):
        """(cond, uncond) contexts, each (1, n * 77, width); n > 1 for prompts longer than 75 tokens. Words of
        loaded textual-inversion embeddings become their vectors (embeddings.py). clip_skip: A1111's "CLIP skip"
        (1 = the last layer, 2 = the one before it; clip.py), i.e. diffusers' clip_skip=k is ours k + 1."""
        encode = lambda text: self.embeddings.tokenize(text, self.model.tokenizer.encode)
        c_ids, c_w, u_ids, u_w = prompt_pair_tokens(self.model.tokenizer, prompt, negative_prompt, emphasis,
                                                    encode=encode, words=self.embeddings.spans())
        # one pass per prompt (as diffusers does): half the working memory of one batch of both, at the same speed
        encoder = self.model.text_encoder
        z = torch.cat([self.embeddings.encode(encoder, ids.to(self.device), clip_skip) for ids in (c_ids, u_ids)])
        z = apply_emphasis(z, torch.cat([c_w, u_w]).to(self.device))
        cond, uncond = z.chunk(2)
        return cond.reshape(1, -1, z.shape[-1]), uncond.reshape(1, -1, z.shape[-1])

    # -- the loop -----------------------------------------------------------------------------------------

    def _check(self, cfg, width, height, batch, inpainting=False):
        """The arguments samplers.check does not see (it checks steps, sampler, schedule, eta and churn)."""
        channels = self.model.config.unet.in_channels
        if channels != 4 and not inpainting:
            raise ValueError(f"{self.name} is an inpainting model (a U-Net with {channels} input channels): it "
                             f"needs a mask; use inpaint (minisd inpaint / outpaint)")
        if cfg < 0:
            raise ValueError(f"cfg must be >= 0, got {cfg}")
        f = self.factor
        for name, v in (("width", width), ("height", height)):
            if not isinstance(v, int) or v < f or v % f:
                raise ValueError(f"{name} must be a positive multiple of {f} (the VAE downsamples by {f}), "
                                 f"got {v!r}")
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")

    def _noise(self, plan, seeds, generators, shape):
        """The sampler's noise source: for each seed, draws shaped `shape` from its generator (the SDE samplers: its
        Brownian tree, seeded with the seed: diffusers' noise_sampler_seed), concatenated over the seeds."""
        if plan.brownian:
            sources = [samplers.brownian_noise(s, shape, *plan.brownian, device=self.device, dtype=self.dtype)
                       for s in seeds]
        else:
            sources = [samplers.noise_from(g, shape, self.device, self.dtype) for g in generators]
        if len(sources) == 1:
            return sources[0]
        return lambda sigma=None, sigma_next=None: torch.cat([source(sigma, sigma_next) for source in sources])

    @torch.no_grad()
    def _sample(self, x, plan, cond, uncond, cfg, noise, callback, rescale, unet_call=None):
        """Run the plan from x at plan.sigmas[0]: the guided denoiser and a progress bar. cond and uncond: one
        context for the batch (1, L, C) or one per image (B, L, C). unet_call: the U-Net call (x, t, context) to
        sample with; None: self.unet_call."""
        # the per-step constants go to the device here, before the loop (see diffusion.make_denoiser), and the
        # samplers get the sigmas as Python floats: no step reads anything back from a tensor
        unet_call = self.unet_call if unet_call is None else unet_call
        denoise = diffusion.make_denoiser(unet_call, self.alphas_cumprod, self.model.config.prediction,
                                          plan.interpolation, sigmas=plan.sigmas, device=self.device,
                                          dtype=self.dtype)
        batch = x.shape[0]
        denoise = diffusion.cfg_denoiser(denoise, cond.expand(batch, -1, -1), uncond.expand(batch, -1, -1),
                                         scale=cfg, rescale=rescale)
        # a tqdm bar over the steps (a no-op unless self.progress); the samplers call back once per step
        bar = tqdm(total=len(plan.sigmas) - 1, desc=plan.sampler, unit="step", disable=not self.progress)

        def counted(i, x, denoised, sigma):
            bar.update(1)
            if callback:
                callback(i, x, denoised, sigma)
        with bar:
            return samplers.sample(plan, denoise, x, noise=noise, callback=counted)

    def _encode(self, pixels, generator):
        """The scaled latent of pixels (B, 3, H, W): a sample of the VAE posterior, its N(0, I) draw taken from
        `generator` on the CPU (diffusers' `latent_dist.sample(generator)`)."""
        vae = self.model.vae
        mean, logvar = vae.posterior(pixels.to(self.device, self.vae_dtype))
        eps = torch.randn(mean.shape, generator=generator)
        return ((mean + torch.exp(0.5 * logvar) * eps.to(mean)) * vae.cfg.scale_factor).to(self.dtype)

    # -- ControlNet ---------------------------------------------------------------------------------------

    def _check_controls(self, controls):
        for c in controls:
            if not isinstance(c, controlnet.Control):
                raise ValueError(f"controls must be a list of controlnet.Control, got {type(c).__name__}")
            c.check(self.model.config)

    @contextlib.contextmanager
    def _controlled(self, controls, plan, width, height, batch):
        """The U-Net call with `controls` added (controlnet.controlled_unet), or None without controls, for the
        sampling run inside the `with`. It calls the U-Net module itself: the compiled / CUDA-graph call is bypassed
        while a ControlNet is in use, and each step reads its t back to the host to find its step.

        On the CPU with oneDNN-prepared layers (prepack), the ControlNets run prepared when the U-Net does: each
        is a copy of the U-Net's encoder, the same layers at the same shapes, so the U-Net's measured choice holds
        for them. Before that choice is made (the first generation of a process), it is measured on this call, the
        U-Net and the ControlNets prepared together (fast.MeasuredChoice), and kept for the U-Net's own call. The
        ControlNets are given back plain when the run ends, holding their own Parameter objects again: they are the
        caller's networks (a training run's, perhaps, whose optimizer holds those Parameters), and a prepared network
        has no backward and cannot move. (Holding the plain weights during the run costs their memory once more;
        a loaded file's are memory-mapped pages the system can drop.)"""
        if not controls:
            yield None
            return
        nets = [c.net.to(self.device, self.dtype).eval() for c in controls]
        own = [dict(net.named_parameters()) for net in nets]
        hints = [controlnet.control_image(c.image, width, height).to(self.device, self.dtype) for c in controls]
        # the step of a U-Net call is found by its t, computed as make_denoiser computes it
        sigmas_train = diffusion.sigmas_from_alphas_cumprod(self.alphas_cumprod.to(torch.float64).cpu())
        timesteps = diffusion.sigma_to_t(plan.sigmas[:-1], sigmas_train, plan.interpolation)
        call = controlnet.controlled_unet(self.model.unet, controls, hints, timesteps, batch)
        unet_choice = self.unet_call if isinstance(self.unet_call, fast.MeasuredChoice) else None
        measured = None
        if unet_choice is not None and unet_choice.choice == "prepared":
            for net in nets:
                fast.onednn.prepare(net)
        elif unet_choice is not None and unet_choice.choice is None:
            call = measured = fast.MeasuredChoice(call, self.log, modules=[self.model.unet, *nets],
                                                  what="U-Net + ControlNet call")
        try:
            yield call
        finally:
            if measured is not None and measured.choice is not None:
                unet_choice.choice = measured.choice     # the U-Net's layers are as chosen: no second measurement
            for net, params in zip(nets, own):
                fast.onednn.restore(net)
                for name, p in params.items():         # the very Parameters (restore made equal new ones)
                    owner, _, attr = name.rpartition(".")
                    setattr(net.get_submodule(owner), attr, p)

    def set_memory_options(self, attention_slice=None, vae_tile=None):
        """Trade speed for memory: attention computed `attention_slice` queries at a time (exactly the same
        result), and the VAE decoding `vae_tile` x `vae_tile` latent tiles with blended seams (approximately)."""
        self.model.unet.set_attention_slicing(attention_slice)
        self.model.vae.set_attention_slicing(attention_slice)
        self.vae_tile = vae_tile
        if isinstance(self.unet_call, fast.CUDAGraphUNet):
            self.unet_call.graphs.clear()       # recorded with the old options: record again at the next call

    @torch.no_grad()
    def decode(self, latents):
        return self.model.vae.decode(latents.to(self.vae_dtype), tile=self.vae_tile)

    def decode_preview(self, latents):
        return to_pil(self.decode(latents))

    @torch.no_grad()
    def generate(self, prompt, negative_prompt="", steps=DEFAULT_STEPS, cfg=DEFAULT_CFG, sampler=DEFAULT_SAMPLER,
                 schedule=None, eta=None, seed=None, width=None, height=None, batch=1, emphasis=False,
                 callback=None, rescale=0.0, churn=None, controls=(), clip_skip=1, subseed=None,
                 subseed_strength=0.0, hires=None) -> Result:
        """txt2img.

        prompt and seed: one prompt and one seed (None draws a random one, returned in the Result and printed by
        the CLI) make `batch` images drawn by one generator, as diffusers does. A list of prompts with a list of
        seeds (or one prompt with a list of seeds) makes one image per (prompt, seed) pair, each equal to that
        pair generated alone (see the module's noise convention); pairs whose prompts name different
        <lora:NAME:MULT> tags (other weights) or encode to different lengths (over 75 tokens) are then run one at
        a time, and `callback` is called once per step of each run.
        churn: {"s_churn": ..., "s_tmin": ..., "s_tmax": ..., "s_noise": ...} for euler, heun and dpm2
        (Karras et al. 2022, Alg. 2; A1111's sampler settings), None for none.
        controls: [controlnet.Control(net, image, scale, start, end, guess_mode)], each ControlNet's residuals
        added to the U-Net's (summed when there are several); see _controlled.
        subseed, subseed_strength: a variation seed (variation.py): image b's starting noise is slerped toward
        subseed + b's (a list: one per seed; None: a random one) by subseed_strength, 0 (none) to 1.
        hires: a hires.Hires: the images generated at width x height, then upscaled and refined by a second
        img2img pass at the larger size (A1111's hires fix, see hires.py).
        clip_skip: condition on the text encoder's layer clip_skip - 1 before the last (encode_prompts)."""
        size = self.model.config.image_size
        width, height = width or size, height or size
        plan = self.plan(sampler, schedule, steps, eta, churn)
        self._check(cfg, width, height, batch)
        prompts, seeds, per_seed = _pairs(prompt, seed, batch)
        subseeds = variation.subseeds_for(seeds, subseed, subseed_strength)
        if hires is not None:
            hires.check()
            self._check(cfg, *hires.size(width, height, self.factor), batch)
        self._check_controls(controls)

        def one_at_a_time():
            runs = [self.generate(p, negative_prompt, steps, cfg, sampler, schedule, eta, s, width, height, 1,
                                  emphasis, callback, rescale, churn, controls, clip_skip,
                                  subseeds and [subseeds[i]], subseed_strength, hires)
                    for i, (p, s) in enumerate(zip(prompts, seeds))]
            return Result([image for r in runs for image in r.images], torch.cat([r.latents for r in runs]), seeds,
                          plan.sampler, plan.schedule, subseeds)
        if len({tuple(parse_lora_tags(p)[1]) for p in prompts}) > 1:
            return one_at_a_time()
        contexts = [self.encode_prompts(self._prompt_loras(p), negative_prompt, emphasis, clip_skip) for p in prompts]
        if len({(c.shape, u.shape) for c, u in contexts}) > 1:
            return one_at_a_time()
        cond, uncond = torch.cat([c for c, _ in contexts]), torch.cat([u for _, u in contexts])   # (1 or B, L, C)
        shape = (per_seed, self.model.config.unet.in_channels, height // self.factor, width // self.factor)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        x = self._start_noise(generators, shape, subseeds, subseed_strength) * plan.init_sigma   # (B, 4, H/8, W/8)
        with self._controlled(controls, plan, width, height, x.shape[0]) as unet_call:
            latents = self._sample(x.to(self.device, self.dtype), plan, cond, uncond, cfg,
                                   self._noise(plan, seeds, generators, shape), callback, rescale, unet_call)
        if hires is not None:
            # the second pass's steps are numbered on after the first's (--save-steps keeps both)
            later = callback and (lambda i, *a: callback(len(plan.sigmas) - 1 + i, *a))
            latents = self._hires_pass(latents, hires, plan, steps, eta, churn, cond, uncond, cfg, seeds, per_seed,
                                       subseeds, subseed_strength, later, rescale, controls, width, height)
        return Result(to_pil(self.decode(latents)), latents, seeds, plan.sampler, plan.schedule, subseeds)

    def _start_noise(self, generators, shape, subseeds, subseed_strength, before=None):
        """The starting noise (B, C, H, W): each generator's draw of `shape` (on the CPU: device-independent), each
        bent toward its variation seed's draw if there is one (variation.mix; `before`: the shape of the draw
        the generators took first, which the variation seeds' generators take too)."""
        noise = torch.cat([torch.randn(shape, generator=g) for g in generators])
        return variation.mix(noise, subseeds, subseed_strength, shape, before)

    def _hires_pass(self, latents, hires, plan, steps, eta, churn, cond, uncond, cfg, seeds, per_seed, subseeds,
                    subseed_strength, callback, rescale, controls, width, height):
        """The hires fix's second pass (hires.py) on the first pass's latents (B, 4, h, w) made at width x height:
        upscaled, noised with the seeds' fresh noise at the new size, and sampled for the last of its steps."""
        width, height = hires.size(width, height, self.factor)
        total, run = hires.schedule(steps)
        plan = self.plan(plan.sampler, plan.schedule, total, eta, churn).last(run)
        shape = (per_seed, latents.shape[1], height // self.factor, width // self.factor)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        if hires.upscaler in LATENT_MODES:
            x0, before = upscale_latents(latents, shape[-2:], hires.upscaler), None
        else:   # decoded, resized, encoded again: the posterior sample is each generator's first draw
            pixels = to_tensor(upscale_images(to_pil(self.decode(latents)), width, height))    # (B, 3, H, W)
            x0 = torch.cat([self._encode(p, g) for p, g in zip(pixels.split(per_seed), generators)])
            before = shape
        noise = self._start_noise(generators, shape, subseeds, subseed_strength, before)
        x = diffusion.add_noise(x0.to(self.device, self.dtype), noise.to(self.device, self.dtype),
                                plan.sigmas[0].item())
        with self._controlled(controls, plan, width, height, x.shape[0]) as unet_call:
            return self._sample(x, plan, cond, uncond, cfg, self._noise(plan, seeds, generators, shape), callback,
                                rescale, unet_call)

    @torch.no_grad()
    def img2img(self, prompt, init_image, strength=0.75, negative_prompt="", steps=DEFAULT_STEPS, cfg=DEFAULT_CFG,
                sampler=DEFAULT_SAMPLER, schedule=None, eta=None, seed=None, batch=1, emphasis=False,
                callback=None, rescale=0.0, churn=None, controls=(), clip_skip=1, subseed=None,
                subseed_strength=0.0) -> Result:
        """img2img (SDEdit, Meng et al. 2022): encode the image, noise it to the level `strength` selects with the
        forward process, and run only the remaining steps.

        The arithmetic (diffusers' StableDiffusionImg2ImgPipeline, so the same seed gives the same image):
        `steps` sigmas are laid out as for txt2img, int(steps * strength) of them are run — the last ones — and
        the latent starts at the first of those: x = x0 + sigma_start * noise (the forward process in sigma
        space). strength 0 runs no step and returns the input. strength 1 runs every step and still starts from
        x0 + sigma_max * noise, as diffusers does: at SD's sigma_max (14.6) the image is 7% of the signal, enough to
        carry its layout and colours into the result; that is not txt2img.

        seed: one seed (None: a random one) draws all `batch` images from one generator, as diffusers does; a list
        of seeds makes one image per seed, each generated alone (one run per seed), as A1111's batch.
        controls, clip_skip: as generate's; the control images are resized to the init image's size.
        subseed, subseed_strength: as generate's; they bend the forward-process noise. The VAE posterior sample
        stays the seed's draw (A1111 takes it from its global RNG, not from any seed).
        """
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if isinstance(seed, (list, tuple)):
            _, seeds, _ = _pairs(prompt, seed, batch)
            subseeds = variation.subseeds_for(seeds, subseed, subseed_strength)
            runs = [self.img2img(prompt, init_image, strength, negative_prompt, steps, cfg, sampler, schedule, eta,
                                 s, 1, emphasis, callback, rescale, churn, controls, clip_skip,
                                 subseeds and [subseeds[i]], subseed_strength) for i, s in enumerate(seeds)]
            latents = None if runs[0].latents is None else torch.cat([r.latents for r in runs])
            return Result([r.images[0] for r in runs], latents, seeds, runs[0].sampler, runs[0].schedule, subseeds)
        image = from_pil(init_image, self.factor, log=self.log)     # (1, 3, H, W)
        height, width = image.shape[-2:]
        plan = self.plan(sampler, schedule, steps, eta, churn)
        self._check(cfg, width, height, batch)
        self._check_controls(controls)
        seed = random.randrange(2 ** 32) if seed is None else int(seed)
        subseeds = variation.subseeds_for([seed], subseed, subseed_strength)
        run = min(int(steps * strength), steps)
        if run == 0:
            self.log(f"strength {strength} x {steps} steps rounds to 0 steps: returning the input image")
            pil = to_pil(image)[0]
            return Result([pil] * batch, None, [seed], plan.sampler, plan.schedule, subseeds)
        generator = torch.Generator().manual_seed(seed)
        prompt = self._prompt_loras(prompt)
        cond, uncond = self.encode_prompts(prompt, negative_prompt, emphasis, clip_skip)
        plan = plan.last(run)
        x0 = self._encode(image, generator)                          # the posterior sample's draw, then ...
        posterior = tuple(x0.shape)
        x0 = x0.expand(batch, -1, -1, -1)                            # one encoding serves the batch (diffusers)
        noise = self._start_noise([generator], tuple(x0.shape), subseeds, subseed_strength,
                                  before=posterior)                  # ... the forward-process noise
        x = diffusion.add_noise(x0.to(self.dtype), noise.to(self.device, self.dtype), plan.sigmas[0].item())
        with self._controlled(controls, plan, width, height, batch) as unet_call:
            latents = self._sample(x, plan, cond, uncond, cfg,
                                   self._noise(plan, [seed], [generator], tuple(x.shape)), callback, rescale,
                                   unet_call)
        return Result(to_pil(self.decode(latents)), latents, [seed], plan.sampler, plan.schedule, subseeds)

    @torch.no_grad()
    def inpaint(self, prompt, init_image, mask, strength=1.0, negative_prompt="", steps=DEFAULT_STEPS,
                cfg=DEFAULT_CFG, sampler=DEFAULT_SAMPLER, schedule=None, eta=None, seed=None, batch=1,
                emphasis=False, callback=None, rescale=0.0, churn=None, mask_blur=4, invert_mask=False,
                masked_content="original", only_masked=False, padding=32, composite=True, width=None,
                height=None, controls=(), clip_skip=1) -> Result:
        """Repaint the white part of `mask`; the steps are in inpaint.py (outpainting: inpaint.extend, then this).

        mask: any mode, resized to the image, white = repaint (invert_mask: black = repaint), blurred by mask_blur
        px for the composite. masked_content: what the masked area starts as: "original", "fill" (the colours
        around it, A1111's), "latent-noise" (fresh noise in its latent). strength: as img2img's, int(steps *
        strength) steps run; 1.0 starts from pure noise (diffusers' `is_strength_max`), so the masked area owes
        nothing to what was there.
        only_masked: inpaint the mask's bounding box plus `padding` px at width x height (default: the model's
        size) and paste it back (A1111's "Inpaint area: Only masked"; diffusers' padding_mask_crop). Otherwise
        width and height resize the image (default: its own size).
        composite: paste the original back outside the blurred mask (A1111); False returns the decoded image as
        diffusers does. With composite=False and mask_blur=0 the same seed gives diffusers'
        StableDiffusionInpaintPipeline's image (with padding_mask_crop: composite=True, which diffusers does then).
        seed: as img2img's (a list: one run per seed).
        controls: as generate's; each control image is resized to the size inpainted (the box, with only_masked).
        clip_skip: as generate's.
        """
        if isinstance(seed, (list, tuple)):
            _, seeds, _ = _pairs(prompt, seed, batch)
            runs = [self.inpaint(prompt, init_image, mask, strength, negative_prompt, steps, cfg, sampler, schedule,
                                 eta, s, 1, emphasis, callback, rescale, churn, mask_blur, invert_mask,
                                 masked_content, only_masked, padding, composite, width, height, controls,
                                 clip_skip)
                    for s in seeds]
            return Result([r.images[0] for r in runs], torch.cat([r.latents for r in runs]), seeds,
                          runs[0].sampler, runs[0].schedule)
        if masked_content not in inpaint.MASKED_CONTENT:
            raise ValueError(f"masked_content must be one of {', '.join(inpaint.MASKED_CONTENT)}, "
                             f"got {masked_content!r}")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        run = min(int(steps * strength), steps)
        if run == 0:
            raise ValueError(f"strength {strength} x {steps} steps rounds to 0 steps: nothing would be repainted")
        original = to_pil(from_pil(init_image, self.factor, log=self.log))[0]   # RGB, sides a multiple of 8
        if only_masked:
            size = (width or self.model.config.image_size, height or self.model.config.image_size)
        else:
            size = (width or original.width, height or original.height)
        self._check(cfg, *size, batch, inpainting=True)
        self._check_controls(controls)
        plan = self.plan(sampler, schedule, steps, eta, churn).last(run)
        if not only_masked and size != original.size:
            original = original.resize(size, Image.LANCZOS)
        mask = inpaint.prepare_mask(mask, original.size, invert_mask, mask_blur)
        image, region_mask, region = original, mask, None
        if only_masked:
            region = inpaint.crop_region(mask, *size, padding)
            image, region_mask = (im.crop(region).resize(size, Image.LANCZOS) for im in (original, mask))
        if masked_content == "fill":
            image = inpaint.fill(image, region_mask)
        seed = random.randrange(2 ** 32) if seed is None else int(seed)
        cond, uncond = self.encode_prompts(self._prompt_loras(prompt), negative_prompt, emphasis, clip_skip)
        latents = self._inpaint_latents(image, region_mask, strength, plan, cond, uncond, cfg, seed, batch,
                                        masked_content, callback, rescale, controls)
        images = [inpaint.paste_back(im, original, mask, region, composite) for im in to_pil(self.decode(latents))]
        return Result(images, latents, [seed], plan.sampler, plan.schedule)

    def _inpaint_latents(self, image, mask, strength, plan, cond, uncond, cfg, seed, batch, masked_content,
                         callback, rescale, controls=()):
        """The sampling of inpaint(), on `image` (PIL) with `mask` (PIL "L"), both at the size inpainted."""
        nine_channels = self.model.config.unet.in_channels == 9
        generator = torch.Generator().manual_seed(seed)
        pixels = to_tensor([image])                                       # (1, 3, H, W)
        repaint = inpaint.binarize(mask)                                  # (1, 1, H, W), 1 = repaint
        # diffusers' draws, in its order: the image's posterior sample (not needed when a 9-channel model starts
        # from pure noise), the initial noise, then the masked image's posterior sample
        x0 = self._encode(pixels, generator) if strength < 1 or not nine_channels else None
        height, width = pixels.shape[-2:]
        shape = (batch, self.model.config.unet.out_channels, height // self.factor, width // self.factor)
        noise = torch.randn(shape, generator=generator).to(self.device, self.dtype)    # (B, 4, H/8, W/8)
        masked = self._encode(pixels * (repaint < 0.5), generator)        # the masked pixels grey (0)
        small = F.interpolate(repaint, size=shape[-2:]).to(self.device, self.dtype)    # nearest, as diffusers
        if masked_content == "latent-noise" and x0 is not None:          # A1111: after all of diffusers' draws
            x0 = x0 * (1 - small) + torch.randn(x0.shape, generator=generator).to(x0) * small
        if strength == 1:
            x = noise * plan.init_sigma
        else:
            x = diffusion.add_noise(x0, noise, plan.sigmas[0].item())
        # the ControlNets (if any) read the latent the U-Net's input is built from, so they go innermost
        with self._controlled(controls, plan, width, height, batch) as controlled:
            unet_call = controlled or self.unet_call
            if nine_channels:
                unet_call = inpaint.conditioned_unet(unet_call, small, masked)
            else:
                unet_call = inpaint.blended_unet(unet_call, small, x0, noise, plan.sigmas[0].item(),
                                                 self.sigmas_train, plan.interpolation)
            latents = self._sample(x, plan, cond, uncond, cfg, self._noise(plan, [seed], [generator], shape),
                                   callback, rescale, unet_call=unet_call)
        # diffusers' blend after the last step, at sigma 0: the kept region is the original latent itself
        return latents if nine_channels else small * latents + (1 - small) * x0
