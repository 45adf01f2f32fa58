"""AUTOMATIC1111's web API (/sdapi/v1) in minisd's terms: the request fields, what each one means here, the limits,
and the replies (base64 PNGs carrying the `parameters` text chunk that `minisd generate` writes).

A request is read in three passes, each failing with one line (a 422):
  1. pydantic types the fields minisd acts on (`Txt2Img`, `Img2Img`); anything else is an "extra" field;
  2. an extra field is accepted only if A1111 defines it and it changes nothing at the value sent (`NEUTRAL`:
     clients such as webuiapi send every field with its default: hires fix off, no face restoration, ...),
     else it is named in the error, never silently ignored;
  3. `settings` turns the fields into Pipeline arguments, checked (sampler, limits, LoRA names) before queueing.

Where a field is left out, minisd's defaults apply (DPM++ 2M Karras, 20 steps, CFG 7.5, the model's own size), so
`{"prompt": "a fox", "seed": 1}` gives `minisd generate "a fox" --seed 1 --emphasis`'s image. Prompts are read
with A1111's emphasis syntax, "(word:1.3)", as the web UI always does.
"""
import base64
import binascii
import io
import json
import random
import time
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo
from pydantic import BaseModel, ConfigDict

from .. import samplers
from ..inpaint import mask_parameters
from ..images import a1111_parameters, to_pil
from ..pipeline import DEFAULT_CFG, DEFAULT_STEPS
from ..prompts import parse_lora_tags
from .jobs import Interrupted

MAX_SIDE = 2048         # pixels, width and height
MAX_STEPS = 150         # A1111's UI slider stops at 150
MAX_IMAGES = 16         # batch_size * n_iter of one request
MAX_CFG = 100.0
MAX_SEED = 2 ** 63 - 1 - MAX_IMAGES     # a torch.Generator seed, with room for seed + k

# A1111's "Schedule type" names (1.9+) -> minisd's schedules; "automatic" is the sampler's own default
SCHEDULERS = {"automatic": None, "uniform": "discrete", "karras": "karras", "exponential": "exponential"}


class Txt2Img(BaseModel):
    """The fields of /sdapi/v1/txt2img that minisd acts on, with A1111's names. None: minisd's default."""
    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1                      # -1: a random seed; image k of the request has seed + k (A1111)
    sampler_name: str | None = None     # "Euler a", "DPM++ 2M Karras", or a minisd key ("euler_a")
    sampler_index: str | None = None    # A1111's older name for sampler_name, read when that is absent
    scheduler: str | None = None        # "Automatic", "Uniform", "Karras", "Exponential"
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    batch_size: int = 1                 # images per sampling run
    n_iter: int = 1                     # runs
    eta: float | None = None            # ancestral samplers' noise amount
    s_churn: float = 0.0                # Karras et al. 2022, Alg. 2 (euler, heun, dpm2)
    s_tmin: float = 0.0
    s_tmax: float = 0.0                 # 0: no upper bound (A1111)
    s_noise: float = 1.0
    send_images: bool = True
    alwayson_scripts: dict | None = None    # extensions: ControlNet's units only (controlnet_units.py)


class Img2Img(Txt2Img):
    init_images: list[str]              # base64 PNG/JPEG (a data: URL prefix is allowed); one image
    denoising_strength: float = 0.75
    resize_mode: int = 0                # 0: "Just resize" to width x height, the only mode here
    # inpainting (Pipeline.inpaint), A1111's fields and API defaults; they act only with a mask
    mask: str | None = None             # base64; white = repaint
    mask_blur: int = 4
    inpainting_fill: int = 0            # masked content: 0 fill, 1 original, 2 latent noise (3 latent nothing: no)
    inpaint_full_res: bool = True       # "Inpaint area: Only masked", inpainted at width x height
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0     # 1: black = repaint


ANY = object()          # any value changes nothing here
# Fields A1111 defines that minisd accepts only at values that change nothing, and why.
NEUTRAL = {
    "styles": ((None, []), "saved styles"),
    "subseed": (ANY, "acts only with subseed_strength"),
    "subseed_strength": ((0,), "variation seeds"),
    "seed_resize_from_h": ((-1, 0), "seed resize"),
    "seed_resize_from_w": ((-1, 0), "seed resize"),
    "restore_faces": ((None, False), "face restoration"),
    "tiling": ((None, False), "tiling"),
    "do_not_save_samples": (ANY, "the server saves no files"),
    "do_not_save_grid": (ANY, "the server saves no files"),
    "save_images": ((False,), "the server saves no files"),
    "override_settings": ((None, {}), "override_settings (set the model with POST /sdapi/v1/options)"),
    "override_settings_restore_afterwards": (ANY, "acts only with override_settings"),
    "script_name": ((None, ""), "scripts"),
    "script_args": ((None, []), "scripts"),
    "disable_extra_networks": ((False,), "disable_extra_networks"),
    "s_min_uncond": ((None, 0), "skipping the negative prompt below a sigma"),
    "comments": (ANY, "comments"),
    "force_task_id": (ANY, "task ids (one queue, answered in order)"),
    "infotext": ((None, ""), "infotext"),
    "refiner_checkpoint": ((None, ""), "the refiner"),
    "refiner_switch_at": (ANY, "acts only with refiner_checkpoint"),
}
TXT2IMG_NEUTRAL = NEUTRAL | {
    "enable_hr": ((False,), "hires fix"),
    # the hires fix's settings: they act only with enable_hr
    **{k: (ANY, "acts only with enable_hr") for k in (
        "denoising_strength", "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler",
        "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name",
        "hr_scheduler", "hr_prompt", "hr_negative_prompt", "hr_additional_modules", "firstpass_image")},
}
IMG2IMG_NEUTRAL = NEUTRAL | {
    "image_cfg_scale": (ANY, "acts only on instruct-pix2pix models"),
    "initial_noise_multiplier": ((None, 1), "initial_noise_multiplier"),
    "include_init_images": ((False,), "include_init_images"),
    "latent_mask": ((None,), "a separate latent mask"),
    # A1111 derives these from mask_blur, and rounds the mask's latent as minisd does
    **{k: (ANY, "follows mask_blur") for k in ("mask_blur_x", "mask_blur_y", "mask_round")},
}


def check_extra(request, neutral):
    """Pass 2: every field pydantic did not type is one of `neutral`'s, at a value that changes nothing."""
    for name, value in (request.model_extra or {}).items():
        if name not in neutral:
            raise ValueError(f"unknown field {name!r} (minisd serve takes A1111's /sdapi/v1 fields)")
        allowed, what = neutral[name]
        if allowed is not ANY and value not in allowed:
            raise ValueError(f"{name}={json.dumps(value)[:60]} is not supported by minisd serve ({what}); "
                             f"send {' or '.join(json.dumps(a) for a in allowed)} or leave it out")


@dataclass
class Settings:
    """One request, read: what the worker hands to Pipeline.generate / img2img, and how the reply describes it."""
    prompt: str
    negative_prompt: str
    seeds: list             # one per image, batch after batch
    batch_size: int
    kwargs: dict            # Pipeline keyword arguments: steps, cfg, sampler, schedule, eta, churn, emphasis, size
    display_sampler: str    # A1111's name for the PNG parameters
    send_images: bool = True
    init_image: Image.Image | None = None
    strength: float | None = None
    mask: Image.Image | None = None
    inpaint: dict | None = None     # Pipeline.inpaint's mask settings
    inpaint_fields: dict | None = None      # and their A1111 infotext fields
    units: list = ()                # ControlNet units (controlnet_units.Unit), read by app.py


def _bounded(name, value, limit):
    if value is not None and not 1 <= value <= limit:
        raise ValueError(f"{name}={value} is out of range: 1..{limit} on this server")


def decode_image(text, field):
    """A base64 image (PNG, JPEG, ...; an optional "data:image/...;base64," prefix) -> PIL RGB."""
    text = text.split(",", 1)[1] if text.startswith("data:") else text
    try:
        image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
        image.load()
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError):
        raise ValueError(f"{field}: not a base64-encoded image") from None
    return image.convert("RGB")


def settings(request, loras=()):
    """Pass 3: the request as Pipeline arguments, checked. `loras`: the LoRA names a prompt may use."""
    img2img = isinstance(request, Img2Img)
    check_extra(request, IMG2IMG_NEUTRAL if img2img else TXT2IMG_NEUTRAL)
    for name, value in (("width", request.width), ("height", request.height)):
        _bounded(name, value, MAX_SIDE)
    _bounded("steps", request.steps, MAX_STEPS)
    _bounded("batch_size", request.batch_size, MAX_IMAGES)
    _bounded("n_iter", request.n_iter, MAX_IMAGES)
    _bounded("batch_size * n_iter", request.batch_size * request.n_iter, MAX_IMAGES)
    if request.cfg_scale is not None and not 0 <= request.cfg_scale <= MAX_CFG:      # NaN too
        raise ValueError(f"cfg_scale={request.cfg_scale} is out of range: 0..{MAX_CFG:g} on this server")
    if not (request.seed == -1 or 0 <= request.seed <= MAX_SEED):
        raise ValueError(f"seed={request.seed} is out of range: -1 (a random seed) or 0..{MAX_SEED}")
    if request.scheduler is not None and request.scheduler.lower() not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {request.scheduler!r}; valid: Automatic, Uniform, Karras, Exponential")
    schedule = SCHEDULERS[request.scheduler.lower()] if request.scheduler else None
    sampler = request.sampler_name or request.sampler_index or samplers.DEFAULT
    key, _ = samplers.parse_sampler(sampler)
    # eta as A1111 applies it: to the samplers that take it; clients send one eta for every sampler (webuiapi 1,
    # others 0) and A1111 ignores it elsewhere. Churn only when s_churn > 0 (the other three only shape it), and
    # then a sampler without churn is an error (samplers.check)
    eta = request.eta if key in samplers.ANCESTRAL else None
    churn = None
    if request.s_churn:
        churn = dict(s_churn=request.s_churn, s_tmin=request.s_tmin, s_tmax=request.s_tmax or float("inf"),
                     s_noise=request.s_noise)
    s = samplers.check(sampler, schedule, DEFAULT_STEPS if request.steps is None else request.steps, eta, churn)
    for name, *_ in parse_lora_tags(request.prompt)[1]:
        if name not in loras:
            raise ValueError(f"<lora:{name}>: no LoRA of that name on this server (GET /sdapi/v1/loras lists them)")
    cfg = DEFAULT_CFG if request.cfg_scale is None else request.cfg_scale
    kwargs = dict(steps=s.steps, cfg=cfg, sampler=s.sampler, schedule=s.schedule, eta=s.eta, churn=s.churn,
                  emphasis=True)
    seed = random.randrange(2 ** 32) if request.seed == -1 else request.seed
    read = Settings(request.prompt, request.negative_prompt,
                    [seed + k for k in range(request.batch_size * request.n_iter)], request.batch_size, kwargs,
                    samplers.display_name(s.sampler), request.send_images)
    if not img2img:
        read.kwargs.update(width=request.width, height=request.height)
        return read
    if request.resize_mode != 0:
        raise ValueError(f"resize_mode={request.resize_mode} is not supported (0: just resize)")
    if len(request.init_images) != 1:
        raise ValueError(f"init_images: send one image, got {len(request.init_images)}")
    if not 0 <= request.denoising_strength <= 1:
        raise ValueError(f"denoising_strength={request.denoising_strength} is out of range: 0..1")
    image = decode_image(request.init_images[0], "init_images[0]")
    size = (request.width or image.width, request.height or image.height)
    if size != image.size:          # A1111's "Just resize" (LANCZOS, as its images.resize_image)
        image = image.resize(size, Image.LANCZOS)
    read.init_image, read.strength = image, request.denoising_strength
    if request.mask is not None:
        _inpaint_settings(request, read)
    return read


MASKED_CONTENT = {0: "fill", 1: "original", 2: "latent-noise"}      # A1111's inpainting_fill


def _inpaint_settings(request, read):
    """img2img with a mask is A1111's inpainting: Pipeline.inpaint's settings from its fields, as `minisd
    inpaint` takes them (the "Only masked" box inpainted at width x height)."""
    if request.inpainting_fill not in MASKED_CONTENT:
        raise ValueError(f"inpainting_fill={request.inpainting_fill} is not supported (0 fill, 1 original, "
                         "2 latent noise)")
    if not 0 <= request.mask_blur <= 64 or not 0 <= request.inpaint_full_res_padding <= MAX_SIDE:
        raise ValueError(f"mask_blur={request.mask_blur} or inpaint_full_res_padding="
                         f"{request.inpaint_full_res_padding} is out of range: 0..64 and 0..{MAX_SIDE}")
    if request.inpainting_mask_invert not in (0, 1):
        raise ValueError(f"inpainting_mask_invert={request.inpainting_mask_invert}: 0 or 1")
    if read.strength == 0:
        raise ValueError("denoising_strength=0 with a mask repaints nothing: send more than 0")
    masked_content = MASKED_CONTENT[request.inpainting_fill]
    only_masked = bool(request.inpaint_full_res)
    read.mask = decode_image(request.mask, "mask").convert("L")
    read.inpaint = dict(mask_blur=request.mask_blur, invert_mask=bool(request.inpainting_mask_invert),
                        masked_content=masked_content, only_masked=only_masked,
                        padding=request.inpaint_full_res_padding)
    if only_masked:         # the box is inpainted at width x height; the picture keeps its size
        read.inpaint.update(width=read.init_image.width, height=read.init_image.height)
    read.inpaint_fields = mask_parameters(read.strength, request.mask_blur, bool(request.inpainting_mask_invert),
                                          masked_content, only_masked, request.inpaint_full_res_padding)


# -- running one request on the worker ------------------------------------------------------------------------


def generate(read, pipe, callback, controls=(), control_fields=None):
    """Run `read` on the pipeline as `minisd generate` / `minisd img2img` do (one Pipeline call per batch of
    seeds), with `controls` and their PNG fields as `--controlnet` gives them. Returns (PIL images, their A1111
    parameter lines, whether /interrupt stopped it): an interrupted run ends after its current step, with that
    step's x0 estimate as its images, as A1111 returns what it has."""
    images, infotexts = [], []
    # the PNG fields in the order `minisd generate`, `img2img` and `inpaint` write them
    control_fields = control_fields or {}
    if read.mask is not None:
        extra = {**read.inpaint_fields, **control_fields}
    else:
        extra = {**control_fields, **({} if read.init_image is None else {"denoising_strength": read.strength})}
    for start in range(0, len(read.seeds), read.batch_size):
        seeds = read.seeds[start:start + read.batch_size]
        interrupted = False
        try:
            if read.init_image is None:
                result = pipe.generate(read.prompt, seed=seeds, callback=callback, controls=controls,
                                       negative_prompt=read.negative_prompt, **read.kwargs)
            elif read.mask is not None:
                result = pipe.inpaint(read.prompt, read.init_image, read.mask, read.strength, seed=seeds,
                                      callback=callback, controls=controls, negative_prompt=read.negative_prompt,
                                      **read.inpaint,
                                      **read.kwargs)
            else:
                result = pipe.img2img(read.prompt, read.init_image, read.strength, seed=seeds, callback=callback,
                                      controls=controls, negative_prompt=read.negative_prompt, **read.kwargs)
            done = result.images
        except Interrupted as stop:
            done, interrupted = to_pil(pipe.decode(stop.denoised)), True
        for b, (image, seed) in enumerate(zip(done, seeds)):
            infotexts.append(a1111_parameters(
                read.prompt, read.negative_prompt, read.kwargs["steps"], read.display_sampler, read.kwargs["cfg"],
                seed, image.width, image.height, pipe.name, schedule_type=read.kwargs["schedule"].capitalize(),
                batch_pos=b if len(seeds) > 1 else None, **extra))
        images += done
        if interrupted:
            return images, infotexts, True
    return images, infotexts, False


def png_base64(image, parameters=None):
    """A PIL image as base64 PNG text, with `parameters` in the PNG's "parameters" chunk (as save_png writes)."""
    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def reply(request, read, images, infotexts, model_name, interrupted=False, maps=()):
    """A1111's TextToImageResponse / ImageToImageResponse: images (then ControlNet's condition images `maps`, as
    sd-webui-controlnet appends them), the request's parameters, and `info` (a JSON string, as A1111's
    processed.js())."""
    parameters = request.model_dump(exclude={"init_images"} if read.init_image is not None else set())
    info = dict(prompt=read.prompt, all_prompts=[read.prompt] * len(images), negative_prompt=read.negative_prompt,
                all_negative_prompts=[read.negative_prompt] * len(images), seed=read.seeds[0],
                all_seeds=read.seeds[:len(images)], subseed=-1, all_subseeds=[-1] * len(images), subseed_strength=0,
                width=images[0].width if images else None, height=images[0].height if images else None,
                sampler_name=read.display_sampler, cfg_scale=read.kwargs["cfg"], steps=read.kwargs["steps"],
                batch_size=read.batch_size, restore_faces=False, sd_model_name=model_name,
                denoising_strength=read.strength, infotexts=infotexts, styles=[],
                job_timestamp=time.strftime("%Y%m%d%H%M%S"), clip_skip=1, index_of_first_image=0,
                interrupted=interrupted)
    encoded = [png_base64(image, text) for image, text in zip(images, infotexts)] + [png_base64(m) for m in maps]
    encoded = encoded if read.send_images else []
    return {"images": encoded, "parameters": parameters, "info": json.dumps(info)}
