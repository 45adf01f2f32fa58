"""The Canny annotator equals cv2.Canny, as ControlNet's annotator calls it, pixel for pixel.

Oracles: opencv-python-headless's cv2.Canny / cv2.GaussianBlur and controlnet_aux's CannyDetector (the preprocessor
diffusers' ControlNet docs use), on scikit-image's bundled photos (offline) and on small synthetic images built to
hit one rule of OpenCV's canny.cpp each. Every comparison is exact: the algorithm is integer arithmetic end to end,
so there is no rounding to forgive, and a single wrong tie rule shows up as differing pixels.
"""
import importlib
import math
import sys
import types

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image

from minisd.annotators.canny import canny, gaussian_blur, hysteresis

THRESHOLDS = [(100, 200), (50, 150), (20, 80)]
COLOUR = ["astronaut", "coffee", "chelsea", "rocket"]
GREY = ["camera", "coins", "moon", "page", "brick"]


def _edges(image: Image.Image, low, high, **kw) -> np.ndarray:
    out = np.asarray(canny(image, low, high, **kw))
    assert out.shape[2] == 3 and (out == out[..., :1]).all(), "the three channels must be one grey edge map"
    return out[..., 0]


def _assert_same(ours: np.ndarray, ref: np.ndarray, what: str):
    differ = int((ours != ref).sum())
    assert differ == 0, f"{what}: {differ} of {ref.size} pixels differ (agreement {1 - differ / ref.size:.5%})"


@pytest.mark.parametrize("low, high", THRESHOLDS)
def test_equals_cv2_canny_on_colour_photos(low, high):
    # ControlNet's annotator hands cv2.Canny the RGB array itself (3 channels: per pixel the strongest channel)
    for name in COLOUR:
        rgb = getattr(skimage.data, name)()
        _assert_same(_edges(Image.fromarray(rgb), low, high), cv2.Canny(rgb, low, high), f"{name} {low}/{high}")


@pytest.mark.parametrize("low, high", THRESHOLDS)
def test_equals_cv2_canny_on_grey_photos(low, high):
    for name in GREY:
        grey = getattr(skimage.data, name)()
        _assert_same(_edges(Image.fromarray(grey), low, high), cv2.Canny(grey, low, high), f"{name} {low}/{high}")


def test_photos_have_edges_and_not_everywhere():
    # sanity that the comparisons above compare something: a blank map (or a full one) would be a poor witness
    fraction = (_edges(Image.fromarray(skimage.data.astronaut()), 100, 200) > 0).mean()
    assert 0.005 < fraction < 0.1


# ---- one rule at a time, on images built to need it -------------------------------------------------------------

def test_flat_ridge_two_pixels_wide_keeps_exactly_one_pixel():
    # The ramp 0, 50, 100, 150 gives |dx| = 4 * (right - left) = 200, 400, 400, 200 across it: two equal maxima side
    # by side, of which canny.cpp's `m > left && m >= right` keeps the first only (both >=: two; both >: none).
    row = np.array([0, 0, 0, 50, 100, 150, 150, 150, 150], dtype=np.uint8)
    for image in (np.tile(row, (9, 1)), np.tile(row[:, None], (1, 9))):        # horizontal and vertical gradient
        ref = cv2.Canny(image, 50, 100)
        assert (ref > 0).sum() == 9, "the case must be a one-pixel line out of a two-pixel ridge"
        _assert_same(_edges(Image.fromarray(image), 50, 100), ref, "flat ridge")


def test_diagonal_ridges_in_both_directions():
    # edges at +-45 degrees: the diagonal neighbours chosen by the signs of dx, dy, both compared strictly
    y, x = np.mgrid[:24, :24]
    for field in (x + y, x - y):
        image = np.clip((field - field.min()) * 12, 0, 255).astype(np.uint8)
        ref = cv2.Canny(image, 20, 60)
        assert (ref > 0).any()
        _assert_same(_edges(Image.fromarray(image), 20, 60), ref, "diagonal")


@pytest.mark.parametrize("low, high", [(0, 0), (20, 80), (100, 200), (300, 600)])
def test_ties_on_few_level_colour_noise(low, high):
    # Few grey levels make equal magnitudes common: every > versus >= of the suppression, the choice of the first
    # channel on a tie, the direction boundaries at tan 22.5 and the borders all get exercised many times.
    rng = np.random.default_rng(0)
    for levels in (2, 3, 5):
        image = (rng.integers(0, levels, (48, 64, 3)) * (255 // (levels - 1))).astype(np.uint8)
        _assert_same(_edges(Image.fromarray(image), low, high), cv2.Canny(image, low, high), f"noise {levels}")
        smooth = np.repeat(np.repeat(image, 2, axis=0), 3, axis=1)       # plateaus: wide ties along and across
        _assert_same(_edges(Image.fromarray(smooth), low, high), cv2.Canny(smooth, low, high), f"blocks {levels}")


@pytest.mark.parametrize("height, width", [(1, 1), (1, 6), (6, 1), (2, 2), (3, 7)])
def test_images_smaller_than_the_stencils(height, width):
    # every pixel is a border pixel: replicated for Sobel, zero magnitude beyond for the suppression
    rng = np.random.default_rng(height * 10 + width)
    image = (rng.integers(0, 2, (height, width, 3)) * 255).astype(np.uint8)
    _assert_same(_edges(Image.fromarray(image), 20, 80), cv2.Canny(image, 20, 80), f"{height}x{width}")


def test_hysteresis_grows_through_corners_only_from_strong_pixels():
    # canny.cpp grows each edge into all 8 neighbours: a weak chain touching corner to corner is followed to its
    # end; a weak chain touching nothing strong is dropped. Drawn by hand (S strong, w weak, . neither).
    rows = ["S....w.",
            ".w...w.",
            "..w..w.",
            "...w...",
            "..w.w..",
            ".w.....",
            "w......"]
    strong = np.array([[c == "S" for c in r] for r in rows])
    candidates = np.array([[c != "." for c in r] for r in rows])
    grown = hysteresis(strong=strong, candidates=candidates)
    expected = candidates.copy()
    expected[:3, 5] = False                                       # the chain on the right never touches S
    assert np.array_equal(grown, expected)


# ---- the optional blur ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [0.3, 1.0, 1.4, 2.5])
def test_blur_equals_cv2_gaussian_blur(sigma):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    assert np.array_equal(gaussian_blur(image, sigma), cv2.GaussianBlur(image, (0, 0), sigma))


def test_blurred_canny_equals_cv2_blur_then_canny():
    rgb = skimage.data.coffee()
    ref = cv2.Canny(cv2.GaussianBlur(rgb, (0, 0), 1.4), 50, 150)
    _assert_same(_edges(Image.fromarray(rgb), 50, 150, blur=1.4), ref, "blur 1.4")
    assert (ref != cv2.Canny(rgb, 50, 150)).any(), "the blur must change the edges"


# ---- what ControlNet users get ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def canny_detector():
    """controlnet_aux's CannyDetector, without importing the rest of controlnet_aux: its __init__ imports every
    annotator (timm, segment-anything, ...), several CPU-seconds for one file that needs only util.py. A stand-in
    package object points at the real folder while canny/ loads, then leaves sys.modules as it found it."""
    saved = {k: v for k, v in sys.modules.items() if k == "controlnet_aux" or k.startswith("controlnet_aux.")}
    folder = importlib.util.find_spec("controlnet_aux").submodule_search_locations
    package = types.ModuleType("controlnet_aux")
    package.__path__ = list(folder)
    sys.modules["controlnet_aux"] = package
    try:
        return importlib.import_module("controlnet_aux.canny").CannyDetector()
    finally:
        for k in [k for k in sys.modules if k == "controlnet_aux" or k.startswith("controlnet_aux.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def _photo(name: str) -> np.ndarray:
    if name == "astronaut+alpha":                                # transparency (skimage's logo is opaque): the
        return np.dstack([skimage.data.astronaut(), skimage.data.camera()])      # camera as the alpha channel
    return getattr(skimage.data, name)()


@pytest.mark.parametrize("name, mode, height, width", [
    ("astronaut", "RGB", 512, 512), ("camera", "L", 512, 512), ("coffee", "RGB", 384, 576),
    ("astronaut+alpha", "RGBA", 448, 448)])                      # RGBA: composited on white by HWC3
def test_equals_controlnet_aux_canny_detector(canny_detector, name, mode, height, width):
    # CannyDetector resizes to detect_resolution (short side, rounded to 64) and back; sizes that are already
    # multiples of 64 with that short side make both resizes the identity, leaving its Canny bare.
    image = Image.fromarray(_photo(name)[:height, :width]).convert(mode)
    short = min(height, width)
    for low, high in THRESHOLDS:
        ref = np.asarray(canny_detector(image, low, high, detect_resolution=short, image_resolution=short))
        assert ref.shape == (image.height, image.width, 3)
        ours = np.asarray(canny(image, low, high))
        _assert_same(ours, ref, f"{name} ({mode}) {low}/{high}")


def test_output_is_rgb_white_on_black_at_the_input_size():
    rgb = skimage.data.chelsea()[:101, :77]
    image = Image.fromarray(rgb)
    out = canny(image)
    assert out.mode == "RGB" and out.size == image.size
    assert set(np.unique(np.asarray(out))) == {0, 255}
    assert np.array_equal(np.asarray(image), rgb), "the input image must be left as it was"


@pytest.mark.parametrize("kw, message", [
    (dict(low=200, high=100), "low <= high"),
    (dict(low=-1, high=100), "0 <= low"),
    (dict(low=math.nan, high=100), "0 <= low"),
    (dict(low=100, high=math.inf), "0 <= low"),
    (dict(blur=-1.0), "blur"),
])
def test_bad_arguments_are_one_line_value_errors(kw, message):
    with pytest.raises(ValueError, match=message) as error:
        canny(Image.new("RGB", (8, 8)), **kw)
    assert "\n" not in str(error.value)


def test_empty_image_is_a_value_error():
    with pytest.raises(ValueError, match="empty"):
        canny(Image.new("RGB", (0, 4)))


def test_not_an_image_is_a_value_error():
    with pytest.raises(ValueError, match="PIL.Image"):
        canny(np.zeros((8, 8, 3), dtype=np.uint8))
