"""sd-webui-controlnet's extension API in minisd's terms: `alwayson_scripts.controlnet.args`, a list of units,
each one ControlNet with its condition image, read into what `minisd generate --controlnet` takes, so that a
request and the command with the same settings give the same bytes and the same "ControlNet i" PNG field.

    {"alwayson_scripts": {"controlnet": {"args": [{"module": "canny", "model": "control_v11p_sd15_canny [d14c016b]",
     "image": "<base64>", "weight": 0.8, "threshold_a": 100, "threshold_b": 200, "resize_mode": "Just Resize"}]}}}

  unit field                     minisd
  enabled (default true)         a disabled unit is skipped, whatever else it holds
  module                         none | canny | openpose (body only) = --control-preprocess
  model                          a name GET /controlnet/model_list lists, with or without its " [hash8]"
  weight, guidance_start/_end    --control-scale, --control-start, --control-end (0 <= start < end <= 1)
  image (or input_image)         --control-image: base64, or {"image": base64, "mask": null}
  control_mode                   0 "Balanced"; 2 "ControlNet is more important" = --guess-mode. 1 "My prompt is more
                                 important" scales the residuals in a way diffusers has no equal of: refused
  threshold_a / threshold_b      canny's --canny-low / --canny-high (-1: canny's defaults, 100 and 200)
  resize_mode                    "Just Resize" (0) only: the image is resized to the output size, as the CLI does
  processor_res, pixel_perfect   the annotator's resolution: accepted at their defaults (-1 or 512; false), which
                                 here mean what the CLI does: canny reads the image at its own size, openpose
                                 detects at 512 px on the short side (controlnet_aux's detect_resolution)

Every other field sd-webui-controlnet defines is accepted only at a value that changes nothing (UNIT_NEUTRAL).
"""
import os
from dataclasses import dataclass

from PIL import Image

from ..controls import legacy_hash, load_control
from .a1111 import ANY, decode_image

API_VERSION = 2             # what sd-webui-controlnet's /controlnet/version answers
MAX_UNITS = 3               # its default "ControlNet unit number" (GET /controlnet/settings)
EXTENSIONS = (".safetensors", ".pth", ".ckpt")
MODULES = ("none", "canny", "openpose")
# sd-webui-controlnet's other pose modules draw hands and faces, which minisd's openpose does not
OTHER_POSES = ("openpose_full", "openpose_hand", "openpose_face", "openpose_faceonly", "dw_openpose_full")
CONTROL_MODES = {0: False, "Balanced": False, 2: True, "ControlNet is more important": True}    # -> guess mode
CANNY_DEFAULTS = (100, 200)
RESIZE_MODES = (0, "Just Resize")
PROCESSOR_RES_DEFAULTS = (-1, 512)
ALIASES = {"input_image": "image", "guidance": "guidance_end", "lowvram": "low_vram"}      # older API names
UNIT_NEUTRAL = {
    "low_vram": (ANY, "memory only"),
    "mask": ((None, ""), "a unit mask"),
    "mask_image": ((None, ""), "a unit mask"),
    "hr_option": (ANY, "acts only with the hires fix"),
    "save_detected_map": (ANY, "the condition image is appended to the images unless false"),
    "guessmode": ((None, False), "the old guess mode flag (send control_mode 2)"),
    "input_mode": ((None, "simple", 0), "batch input"),
    "batch_images": ((None, ""), "batch input"),
    "output_dir": ((None, ""), "batch output"),
    "loopback": ((None, False), "loopback"),
    "is_ui": ((None, False), "is_ui"),
    "advanced_weighting": ((None,), "per-layer weights"),
    "effective_region_mask": ((None,), "region masks"),
    "ipadapter_input": ((None,), "IP-Adapter"),
    "pulid_mode": (ANY, "acts only with PuLID"),
    "batch_mask_dir": ((None,), "batch masks"),
    "animatediff_batch": ((None, False), "AnimateDiff"),
}


def controlnet_names(folder):
    """The ControlNets of --controlnet-dir by name (a file's stem, a diffusers folder's name), as
    sd-webui-controlnet lists its models folder: {name: path}."""
    if folder is None:
        return {}
    found = {}
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        weights = os.path.isdir(path) and any(n.startswith("diffusion_pytorch_model") for n in os.listdir(path))
        if weights or (os.path.isfile(path) and entry.endswith(EXTENSIONS)):
            found[os.path.splitext(entry)[0]] = path
    return found


def model_list(folder):
    """GET /controlnet/model_list's names: "name [hash8]", A1111's short hash of the file."""
    return [f"{name} [{legacy_hash(path)}]" for name, path in controlnet_names(folder).items()]


def module_list():
    """GET /controlnet/module_list: the modules and their sliders, as sd-webui-controlnet describes them."""
    detail = {"none": {"model_free": False, "sliders": []},
              "canny": {"model_free": False, "sliders": [
                  {"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048},
                  {"name": "Canny Low Threshold", "value": CANNY_DEFAULTS[0], "min": 1, "max": 255, "step": 1},
                  {"name": "Canny High Threshold", "value": CANNY_DEFAULTS[1], "min": 1, "max": 255, "step": 1}]},
              "openpose": {"model_free": False, "sliders": [
                  {"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048}]}}
    return {"module_list": list(MODULES), "module_detail": detail}


@dataclass
class Unit:
    """One enabled unit, read: the arguments of controls.load_control for one --controlnet."""
    file: str
    image: Image.Image
    module: str
    weight: float
    start: float
    end: float
    guess_mode: bool
    canny_low: int
    canny_high: int
    detected_map: bool


def read_units(scripts, controlnets, only_masked=False):
    """`alwayson_scripts` -> [Unit]; anything minisd cannot do exactly is a ValueError naming the field.
    controlnets: {name: path} of --controlnet-dir; only_masked: an inpainting request's "Only masked"."""
    scripts = scripts or {}
    for name in scripts:
        if name.lower() != "controlnet":
            raise ValueError(f"alwayson_scripts.{name}: not supported by minisd serve (only controlnet)")
    if len(scripts) > 1:
        raise ValueError(f"alwayson_scripts: send controlnet once, got {', '.join(scripts)}")
    if not scripts:
        return []
    script = next(iter(scripts.values()))
    args = script.get("args") if isinstance(script, dict) else None
    if not isinstance(args, list):
        raise ValueError("alwayson_scripts.controlnet: send {\"args\": [unit, ...]}")
    units = []
    for i, unit in enumerate(args):
        if not isinstance(unit, dict):
            raise ValueError(f"alwayson_scripts.controlnet.args[{i}]: a unit is a JSON object")
        if unit.get("enabled", True):
            try:
                units.append(_read_unit(unit, controlnets, only_masked))
            except ValueError as e:
                raise ValueError(f"controlnet unit {i}: {e}") from None
    if len(units) > MAX_UNITS:
        raise ValueError(f"alwayson_scripts.controlnet: {len(units)} enabled units, at most {MAX_UNITS} on this server")
    return units


def _read_unit(unit, controlnets, only_masked):
    unit = dict(unit)
    for old, new in ALIASES.items():
        if old in unit:
            if new in unit:
                raise ValueError(f"send {new} or its old name {old}, not both")
            unit[new] = unit.pop(old)
    get = unit.pop
    get("enabled", None)
    module = str(get("module", "none")).lower()
    if module not in MODULES:
        why = " (it draws hands or faces; minisd's openpose draws the body only)" if module in OTHER_POSES else ""
        raise ValueError(f"module {module!r} is not supported{why}; modules: {', '.join(MODULES)}")
    file = _model_file(str(get("model", "None")), controlnets)
    weight = _number(get("weight", 1.0), "weight", 0, 2)
    start = _number(get("guidance_start", 0.0), "guidance_start", 0, 1)
    end = _number(get("guidance_end", 1.0), "guidance_end", 0, 1)
    if not start < end:
        raise ValueError(f"guidance_start {start} and guidance_end {end}: need start < end")
    image = get("image", None)
    if isinstance(image, dict) and set(image) <= {"image", "mask"} and not image.get("mask"):
        image = image.get("image")
    if not isinstance(image, str) or not image:
        raise ValueError("image: send the condition image as base64 (image or input_image)")
    mode = get("control_mode", 0)
    if isinstance(mode, bool) or not isinstance(mode, (int, str)) or mode not in CONTROL_MODES:
        raise ValueError(f"control_mode {mode!r} is not supported; send 0 (\"Balanced\") or 2 (\"ControlNet is "
                         "more important\", diffusers' guess mode)")
    resize = get("resize_mode", "Just Resize")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize_mode {resize!r} is not supported: send \"Just Resize\" (the image is resized "
                         "to the output size)")
    low, high = get("threshold_a", -1), get("threshold_b", -1)
    res, perfect = get("processor_res", -1), get("pixel_perfect", False)
    if module != "none":        # they set the annotator; without one they change nothing
        if res not in PROCESSOR_RES_DEFAULTS:
            raise ValueError(f"processor_res {res} is not supported: send -1 or 512 (canny reads the image at "
                             "its own size, openpose detects at 512)")
        if perfect:
            raise ValueError("pixel_perfect true is not supported: send false")
    if module == "canny":
        low = CANNY_DEFAULTS[0] if low == -1 else _threshold(low, "threshold_a")
        high = CANNY_DEFAULTS[1] if high == -1 else _threshold(high, "threshold_b")
    crop = get("inpaint_crop_input_image", None)
    if crop and only_masked:
        raise ValueError("inpaint_crop_input_image true is not supported: with \"Only masked\" the whole "
                         "condition image is resized to the inpainted box (send false)")
    detected_map = get("save_detected_map", True)
    _check_neutral(unit)
    return Unit(file, decode_image(image, "image"), module, weight, start, end, CONTROL_MODES[mode],
                low, high, detected_map is not False)


def _model_file(model, controlnets):
    """A listed name, "name" or "name [hash8]" (the hash, when sent, must be the file's)."""
    name, _, tail = model.partition(" [")
    if name in controlnets and (not tail or tail == f"{legacy_hash(controlnets[name])}]"):
        return controlnets[name]
    listed = "GET /controlnet/model_list lists them" if controlnets else "this server has none: --controlnet-dir"
    raise ValueError(f"model: no ControlNet named {model!r} ({listed})")


def _number(value, field, low, high):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{field}={value!r} is out of range: {low}..{high}")
    return value


def _threshold(value, field):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 255 \
            or value != int(value):
        raise ValueError(f"{field}={value!r}: canny's thresholds are whole numbers 1..255 (or -1: 100 and 200)")
    return int(value)


def _check_neutral(unit):
    """The fields left: each one sd-webui-controlnet defines, at a value that changes nothing here."""
    for name, value in unit.items():
        if name not in UNIT_NEUTRAL:
            raise ValueError(f"unknown field {name!r}")
        allowed, what = UNIT_NEUTRAL[name]
        if allowed is not ANY and value not in allowed:
            raise ValueError(f"{name}={value!r} is not supported ({what})")


# -- on the worker ----------------------------------------------------------------------------------------------


def load_units(units, pipe, openpose_weights=None):
    """The units as `minisd generate --controlnet` loads them (controls.load_control, each with its own guess
    mode and thresholds): (controls, their "ControlNet i" PNG fields)."""
    controls, fields = [], {}
    for i, u in enumerate(units):
        control, fields[f"ControlNet {i}"] = load_control(u.file, u.image, u.module, u.weight, u.start, u.end,
                                                          u.guess_mode, pipe.model.config, (u.canny_low, u.canny_high),
                                                          openpose_weights)
        controls.append(control)
    return controls, fields


def detected_maps(units, controls, size):
    """What sd-webui-controlnet appends to the images (unless a unit's save_detected_map is false): each
    condition image as the ControlNet read it, at the output size."""
    maps = [c.image.convert("RGB") for u, c in zip(units, controls) if u.detected_map]
    return [m if m.size == size else m.resize(size, Image.LANCZOS) for m in maps]
