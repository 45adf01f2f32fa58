"""Canny edges (Canny 1986, "A Computational Approach to Edge Detection"), the condition image of the canny ControlNets.

ControlNet's annotator (lllyasviel/ControlNet `annotator/canny`, A1111's extension, controlnet_aux's CannyDetector)
is one call, `cv2.Canny(rgb_uint8, low, high)`, drawn as white edges on black in three channels. This module is that
call written out, stage by stage, in numpy, equal to OpenCV's `canny.cpp` pixel for pixel:

    image (H, W, 3) uint8  -> sobel          dx, dy          (H, W, C) int16  3x3, border replicated
                           -> gradient       |dx|+|dy|       (H, W)          per pixel the strongest channel
                           -> non_maximum_suppression         (H, W) bool     thin ridges, OpenCV's 4 directions
                           -> double threshold + hysteresis   (H, W) bool     strong edges and what touches them

Note what is not there: cv2.Canny does not smooth the image first (Canny's paper does, with a Gaussian), and neither
does the ControlNet annotator, so `blur` is off by default; `blur=sigma` smooths first as the textbook algorithm.
"""
import math

import numpy as np
from PIL import Image


def canny(image: Image.Image, low: float = 100, high: float = 200, blur: float = 0.0) -> Image.Image:
    """Canny edges of `image` as ControlNet's canny annotator draws them: RGB, white (255) edges on black, the input's
    size. Thresholds are on the L1 gradient magnitude |dx|+|dy| of the 3x3 Sobel (0..2040 for 8-bit images): a pixel
    on a ridge above `high` is an edge, one above `low` is an edge if it touches one. `blur` is the sigma of an
    optional Gaussian smoothing first (0: none, as cv2.Canny and ControlNet's annotator)."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"canny: expected a PIL.Image, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"canny: the image is empty ({image.width}x{image.height})")
    if not (0 <= low <= high < math.inf):                   # also catches NaN
        raise ValueError(f"canny: thresholds must satisfy 0 <= low <= high, got low={low}, high={high}")
    if not (0 <= blur < 100):
        raise ValueError(f"canny: blur is a Gaussian sigma in pixels (0 = off), got {blur}")
    rgb = to_rgb(image)                                                  # (H, W, 3) uint8
    if blur > 0:
        rgb = gaussian_blur(rgb, blur)
    if (rgb[..., :1] == rgb).all():          # grey: one channel gives the same edges (ties go to the first), 3x faster
        rgb = rgb[..., :1]
    dx, dy = sobel(rgb)                                                  # (H, W, C) int16 each
    magnitude, dx, dy = gradient(dx, dy)                                 # (H, W) int16 each
    # cv2 compares integer magnitudes with the floored thresholds, strictly (canny.cpp: `m > low`, `m > high`)
    low, high = math.floor(low), math.floor(high)
    peaks = non_maximum_suppression(magnitude, dx, dy) & (magnitude > low)
    edges = hysteresis(strong=peaks & (magnitude > high), candidates=peaks)
    return Image.fromarray(edges.astype(np.uint8) * 255).convert("RGB")          # ControlNet's HWC3: grey to RGB


def to_rgb(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8, as ControlNet's HWC3 makes it: grey repeated to three channels; transparency composited on
    white (`color * alpha + 255 * (1 - alpha)` in float32, truncated to uint8, exactly controlnet_aux's arithmetic)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"))
        color, alpha = rgba[..., :3].astype(np.float32), rgba[..., 3:].astype(np.float32) / 255.0
        return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return np.asarray(image.convert("RGB"))


def gaussian_blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian, G(x) = exp(-x^2 / 2 sigma^2) normalised, in cv2.GaussianBlur's 8-bit arithmetic so that the
    optional blur equals `cv2.GaussianBlur(image, (0, 0), sigma)`: round(6 sigma + 1) taps made odd, weights in
    8-bit fixed point (each rounded with the previous one's rounding error carried over, the centre taking what is
    left so they sum to exactly 256), both passes in exact integers, the result rounded once; the border mirrored
    without repeating the edge pixel (OpenCV's default BORDER_REFLECT_101)."""
    radius = (int(np.rint(6 * sigma + 1)) | 1) // 2
    x = np.arange(-radius, 0, dtype=np.float64)
    g = np.exp(-x**2 / (2 * sigma**2))
    g /= 2 * g.sum() + 1                                                    # the centre's weight is exp(0) = 1
    side, carried = [], 0.0
    for v in g * 256:                                                       # error diffusion, outside in
        side.append(int(np.rint(v + carried)))
        carried = v + carried - side[-1]
    kernel = np.array(side + [256 - 2 * sum(side)] + side[::-1], dtype=np.int64)
    h, w = rgb.shape[:2]
    p = np.pad(rgb.astype(np.int64), ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    p = sum(k * p[:, i:i + w] for i, k in enumerate(kernel))              # horizontal pass, scale 2^8
    p = sum(k * p[i:i + h] for i, k in enumerate(kernel))                 # vertical pass, scale 2^16
    return ((p + (1 << 15)) >> 16).astype(np.uint8)                       # round half up, as OpenCV


def sobel(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel derivatives per channel, dx = [1 2 1]^T [-1 0 1] and dy its transpose (x right, y down), the border
    replicated (cv2.Canny calls Sobel with BORDER_REPLICATE). |dx| <= 4 * 255 fits int16, as in OpenCV."""
    p = np.pad(image.astype(np.int16), ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]

    def at(di, dj):                                  # the neighbour at row offset di, column offset dj
        return p[1 + di:1 + di + h, 1 + dj:1 + dj + w]

    dx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    dy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    return dx, dy


def gradient(dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Magnitude |dx| + |dy| (cv2's default L1 norm, L2gradient=False) of the channel where it is largest, with that
    channel's dx, dy; on a tie the first channel (canny.cpp compares channels with a strict >). (H, W, C) -> (H, W)."""
    magnitude = np.abs(dx) + np.abs(dy)
    channel = magnitude.argmax(axis=2)[..., None]                       # argmax returns the first of equal maxima
    pick = lambda a: np.take_along_axis(a, channel, axis=2)[..., 0]     # noqa: E731
    return pick(magnitude), pick(dx), pick(dy)


# tan(22.5 degrees) in OpenCV's 15-bit fixed point: the direction tests below are integer, so are ours
CANNY_SHIFT = 15
TG22 = int(math.tan(math.pi / 8) * (1 << CANNY_SHIFT) + 0.5)            # 13573


def non_maximum_suppression(magnitude: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Where the magnitude is a maximum across the edge: compared with its two neighbours along the gradient, the
    gradient's angle rounded to one of four directions (0, 45, 90, 135 degrees) as canny.cpp does it, in integers:

        |dy| < |dx| tan 22.5               horizontal gradient: m >  left       and m >= right
        |dy| > |dx| tan 67.5               vertical gradient:   m >  above      and m >= below
        otherwise, dx and dy of one sign:  m >  above-left  and m >  below-right
                   of opposite signs:      m >  above-right and m >  below-left

    The asymmetric > / >= keeps exactly one pixel of a flat-topped ridge two pixels wide. Beyond the image the
    magnitude is 0. (H, W) -> (H, W) bool."""
    h, w = magnitude.shape
    p = np.pad(magnitude, 1)                                                         # zeros outside

    def at(di, dj):
        return p[1 + di:1 + di + h, 1 + dj:1 + dj + w]

    m = magnitude
    x, y = np.abs(dx).astype(np.int32), np.abs(dy).astype(np.int32) << CANNY_SHIFT  # < 2^31: 1020 * 79109
    tg22x = x * TG22
    tg67x = tg22x + (x << (CANNY_SHIFT + 1))                         # tan 67.5 = tan 22.5 + 2
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg67x)
    diagonal = ~horizontal & ~vertical
    same_sign = (dx < 0) == (dy < 0)                 # canny.cpp: (xs ^ ys) >= 0; diagonal pixels have no zero dx, dy
    return (
        (horizontal & (m > at(0, -1)) & (m >= at(0, 1)))
        | (vertical & (m > at(-1, 0)) & (m >= at(1, 0)))
        | (diagonal & same_sign & (m > at(-1, -1)) & (m > at(1, 1)))
        | (diagonal & ~same_sign & (m > at(-1, 1)) & (m > at(1, -1)))
    )


def hysteresis(strong: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """The candidates 8-connected, through candidates, to a strong pixel (canny.cpp grows edges from every strong
    pixel into its 8 neighbours). Found as connected components of the candidate pixels, then kept whole if they hold
    a strong pixel: union-find over the pairs of neighbouring candidates, all pairs at once (hook each root to the
    smaller root of a neighbour, then pointer jumping), a handful of numpy passes where repeated dilation would need
    one per pixel of the longest edge. (canny.cpp seeds only some strong pixels, skipping one whose left or upper
    neighbour is already seeded; the skipped ones are reached by the growth, so the result is the same.)
    (H, W) bool -> (H, W) bool."""
    h, w = candidates.shape
    index = np.full((h + 1, w + 2), -1, dtype=np.int64)             # -1: not a candidate, also one row/col beyond
    index[:h, 1:w + 1][candidates] = np.arange(candidates.sum())
    inner = index[:h, 1:w + 1]
    # every 8-neighbour pair once: right, below-left, below, below-right
    a, b = [], []
    for di, dj in ((0, 1), (1, -1), (1, 0), (1, 1)):
        other = index[di:di + h, 1 + dj:1 + dj + w]
        both = (inner >= 0) & (other >= 0)
        a.append(inner[both])
        b.append(other[both])
    a, b = np.concatenate(a), np.concatenate(b)

    parent = np.arange(int(candidates.sum()))                      # parent[i] <= i, always within i's component
    while True:
        root_a, root_b = parent[a], parent[b]
        if np.array_equal(root_a, root_b):
            break
        smaller = np.minimum(root_a, root_b)
        np.minimum.at(parent, root_a, smaller)                      # hook roots onto the smaller neighbouring root
        np.minimum.at(parent, root_b, smaller)
        while not np.array_equal(parent, parent[parent]):           # jump until every pixel points at its root
            parent = parent[parent]

    has_strong = np.zeros(len(parent), dtype=bool)
    has_strong[parent[inner[strong & candidates]]] = True
    edges = np.zeros((h, w), dtype=bool)
    edges[candidates] = has_strong[parent]
    return edges
