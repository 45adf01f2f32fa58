"""OpenPose body keypoints and the skeleton image ControlNet's openpose models were trained on.

Cao et al. 2017, "Realtime Multi-Person 2D Pose Estimation using Part Affinity Fields" (arXiv:1611.08050): a
VGG-19 front end, then 6 stages of two branches that refine 19 heatmaps (18 body parts and the background) and
38 part affinity fields (PAFs: for each of 19 limbs a 2-D unit vector field pointing along the limb). Parts
are the local maxima of the smoothed heatmaps; a pair of parts is a limb when the PAF between them points
from one to the other (the line integral of Sec. 2.3, sampled at 10 points); limbs are joined into people
greedily. This is the single-scale inference of controlnet_aux's `open_pose/body.py` (itself ControlNet's copy
of Hzzone/pytorch-openpose), followed step by step so that `openpose(image)` gives the same pixels as
controlnet_aux's `OpenposeDetector(image)` with hands and face off.

    image -> resize so the short side is 512 (multiple of 64) -> scale to 184 px tall (0.5 * 368) -> pad to /8
    -> network -> heatmaps, PAFs upsampled x8, cropped, resized to the image -> peaks -> limbs -> people
    -> drawn: limbs as filled ellipses (stick width 4), joints as radius-4 discs, on black

Keypoints can also be read from and written to OpenPose's JSON (`read_keypoints`, `write_keypoints`) and drawn
with `draw_pose`, so a pose can be edited by hand or taken from another tool.
"""
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from weights_convert.io import check_shapes, read_checkpoint, temp_file_beside   # the project's safe reader (weights-only unpickler)

from ..download import fetch_file
from .opencv import ellipse2poly, fill_circle, fill_convex_poly, resize

# The 18 parts, in the COCO order of the OpenPose body model (0-based indices used below)
PARTS = ("nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
         "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
         "right_eye", "left_eye", "right_ear", "left_ear")

# The 19 limbs (pairs of parts) and, for each, its two PAF channels (x, y). The last two (ear-shoulder) only
# help to group; they are not drawn and never start a person.
LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17))
PAF_CHANNELS = ((12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7),
                (8, 9), (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27))

# controlnet_aux's draw_bodypose colours (RGB), one per limb and one per part
COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
          (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
          (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))

BOX_SIZE, SCALE = 368, 0.5          # the network sees the image 0.5 * 368 = 184 px tall (controlnet_aux's one scale)
STRIDE, PAD_VALUE = 8, 128          # the maps are 1/8 of the input; padding is mid-grey
PEAK_THRESHOLD = 0.1                # thre1: a part's smoothed heatmap must exceed this
PAF_THRESHOLD = 0.05                # thre2: a PAF sample must align with the limb by this much
PAF_SAMPLES = 10                    # points on the line integral between two parts
STICK_WIDTH = 4


# ----------------------------------------------------------------------------------------------------------------
# the network
# ----------------------------------------------------------------------------------------------------------------

# (name, in, out, kernel); "pool" is a 2x2 max pool. The names are the checkpoint's (body_pose_model.pth),
# so the weights load by name.
BACKBONE = (("conv1_1", 3, 64, 3), ("conv1_2", 64, 64, 3), "pool",
            ("conv2_1", 64, 128, 3), ("conv2_2", 128, 128, 3), "pool",
            ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3), ("conv3_4", 256, 256, 3),
            "pool",
            ("conv4_1", 256, 512, 3), ("conv4_2", 512, 512, 3),          # VGG-19 up to conv4_2
            ("conv4_3_CPM", 512, 256, 3), ("conv4_4_CPM", 256, 128, 3))  # reduced to 128 features F


def branch(stage: int, limb_or_part: int, out: int):
    """The layers of one branch: L1 predicts the 38 PAFs, L2 the 19 heatmaps. Stage 1 sees the features F;
    stages 2-6 see F with both of the previous stage's outputs (128 + 38 + 19 = 185 channels)."""
    b = f"L{limb_or_part}"
    if stage == 1:
        return tuple((f"conv5_{i}_CPM_{b}", 128, 128, 3) for i in (1, 2, 3)) + \
            ((f"conv5_4_CPM_{b}", 128, 512, 1), (f"conv5_5_CPM_{b}", 512, out, 1))
    return ((f"Mconv1_stage{stage}_{b}", 185, 128, 7),) + \
        tuple((f"Mconv{i}_stage{stage}_{b}", 128, 128, 7) for i in (2, 3, 4, 5)) + \
        ((f"Mconv6_stage{stage}_{b}", 128, 128, 1), (f"Mconv7_stage{stage}_{b}", 128, out, 1))


STAGES = tuple((branch(t, 1, 38), branch(t, 2, 19)) for t in range(1, 7))


class BodyPoseNet(nn.Module):
    """The 2-branch, 6-stage OpenPose body network; one Conv2d attribute per checkpoint name."""

    def __init__(self):
        super().__init__()
        layers = [layer for layer in BACKBONE if layer != "pool"]
        layers += [layer for stage in STAGES for branch_layers in stage for layer in branch_layers]
        for name, c_in, c_out, k in layers:
            self.add_module(name, nn.Conv2d(c_in, c_out, k, padding=k // 2))

    def run(self, layers, x, relu_last=False):
        for i, layer in enumerate(layers):
            if layer == "pool":
                x = F.max_pool2d(x, 2, 2)
                continue
            x = getattr(self, layer[0])(x)
            if i < len(layers) - 1 or relu_last:
                x = F.relu(x)
        return x

    def forward(self, x):
        """x: (B, 3, H, W) BGR / 256 - 0.5 -> PAFs (B, 38, H/8, W/8), heatmaps (B, 19, H/8, W/8)."""
        features = self.run(BACKBONE, x, relu_last=True)
        inputs = features
        for t, (paf_layers, heatmap_layers) in enumerate(STAGES, start=1):
            pafs = self.run(paf_layers, inputs)
            # The reference lists Mconv7_stage6_L1 twice among its layers without ReLU and never
            # Mconv7_stage6_L2, so the final heatmaps pass through a ReLU (kept: it decides which pixels are 0).
            heatmaps = self.run(heatmap_layers, inputs, relu_last=t == 6)
            inputs = torch.cat([pafs, heatmaps, features], 1)
        return pafs, heatmaps


def load_body_pose_model(weights=None) -> BodyPoseNet:
    """The network with the weights of `body_pose_model.pth` (a path; None fetches lllyasviel/Annotators' file
    by name into the cache). The file is read with torch's weights-only unpickler: it can run no code."""
    if weights is None:
        weights = fetch_file("openpose-body")
    net = BodyPoseNet()
    tensors = read_checkpoint(weights)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    try:
        check_shapes(tensors, shapes, "checkpoint", "the body model")
    except ValueError as e:
        raise ValueError(f"{weights}: not the OpenPose body model (body_pose_model.pth): {e}") from None
    net.load_state_dict({k: tensors[k] for k in shapes})
    return net.eval()


# ----------------------------------------------------------------------------------------------------------------
# heatmaps and PAFs at image resolution
# ----------------------------------------------------------------------------------------------------------------

def resize_maps(maps: np.ndarray, width: int, height: int) -> np.ndarray:
    """controlnet_aux's smart_resize: every channel resized alike, Lanczos-4 when growing (by the sum of the
    sides), area averaging when shrinking."""
    h, w = maps.shape[:2]
    return resize(maps, width, height, "area" if (width + height) / (w + h) < 1 else "lanczos4")   # all at once


@torch.no_grad()
def body_maps(net, bgr: np.ndarray):
    """Heatmaps (H, W, 19) and PAFs (H, W, 38), float64, for a uint8 BGR image (H, W, 3)."""
    height, width = bgr.shape[:2]
    scale = SCALE * BOX_SIZE / height
    # controlnet_aux's smart_resize_k: the target size truncated, area averaging when shrinking
    small_h, small_w = int(height * scale), int(width * scale)
    if small_h < 1 or small_w < 1:
        raise ValueError(f"image of {width}x{height} is too narrow to detect poses in")
    small = resize(bgr, small_w, small_h, "area" if scale < 1 else "lanczos4")
    pad_h, pad_w = -small_h % STRIDE, -small_w % STRIDE
    padded = np.pad(small, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=PAD_VALUE)
    x = torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1)[None]).astype(np.float32)) / 256 - 0.5
    device = next((p.device for p in net.parameters()), "cpu") if isinstance(net, nn.Module) else "cpu"
    pafs, heatmaps = net(x.to(device))

    def to_image(maps):                                      # (1, C, h, w) -> (H, W, C)
        maps = maps[0].float().cpu().numpy().transpose(1, 2, 0)
        maps = resize_maps(maps, maps.shape[1] * STRIDE, maps.shape[0] * STRIDE)
        maps = maps[:padded.shape[0] - pad_h, :padded.shape[1] - pad_w]
        return resize_maps(maps, width, height).astype(np.float64)

    return to_image(heatmaps), to_image(pafs)


# ----------------------------------------------------------------------------------------------------------------
# parts: peaks of the smoothed heatmaps
# ----------------------------------------------------------------------------------------------------------------

def gaussian_filter(image: np.ndarray, sigma: float = 3, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage.gaussian_filter of a 2-D float64 array: a separable Gaussian cut at `truncate` sigmas,
    mirror-padded ('reflect': the edge pixel repeated), along rows then columns, each output summed as scipy
    sums a symmetric kernel (centre first, then the pairs from the outside in)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 / (sigma * sigma) * x ** 2)
    weights = weights / weights.sum()
    out = image.astype(np.float64)
    for axis in (0, 1):
        moved = np.moveaxis(out, axis, 0)
        padded = np.pad(moved, [(radius, radius)] + [(0, 0)] * (moved.ndim - 1), mode="symmetric")
        n = moved.shape[0]
        acc = padded[radius:radius + n] * weights[radius]
        for j in range(radius, 0, -1):
            acc = acc + (padded[radius - j:radius - j + n] + padded[radius + j:radius + j + n]) * weights[radius + j]
        out = np.moveaxis(acc, 0, axis)
    return out


def find_peaks(heatmaps: np.ndarray, threshold: float = PEAK_THRESHOLD):
    """For each of the 18 parts, its candidates (x, y, score, id): pixels of the smoothed heatmap that are >= their
    4 neighbours (0 outside the image) and > threshold, in row-major order; the score is the unsmoothed
    heatmap there; ids count up across all parts."""
    peaks, next_id = [], 0
    for part in range(len(PARTS)):
        heatmap = heatmaps[:, :, part]
        smooth = gaussian_filter(heatmap, sigma=3)
        padded = np.pad(smooth, 1)
        center = padded[1:-1, 1:-1]
        is_peak = ((center >= padded[:-2, 1:-1]) & (center >= padded[2:, 1:-1]) & (center >= padded[1:-1, :-2])
                   & (center >= padded[1:-1, 2:]) & (center > threshold))
        ys, xs = np.nonzero(is_peak)
        peaks.append([(int(x), int(y), float(heatmap[y, x]), next_id + i) for i, (x, y) in enumerate(zip(xs, ys))])
        next_id += len(xs)
    return peaks


# ----------------------------------------------------------------------------------------------------------------
# limbs: pairs of parts the PAFs agree with (Cao et al. Sec. 2.3-2.4)
# ----------------------------------------------------------------------------------------------------------------

def limb_scores(paf_x: np.ndarray, paf_y: np.ndarray, cand_a, cand_b, image_height: int) -> np.ndarray:
    """For every pair (i, j) of candidates of parts A and B, the PAF line integral from a to b, sampled at
    PAF_SAMPLES points rounded to pixels: the mean of PAF . unit(b - a), plus a penalty for limbs longer than half
    the image height. NaN where it is no limb: unless more than 80% of the samples exceed PAF_THRESHOLD and the
    score is positive (controlnet_aux's criteria). Returns (len(cand_a), len(cand_b))."""
    shape = (len(cand_a), len(cand_b), 2)
    a = np.broadcast_to(np.array([c[:2] for c in cand_a], np.int64)[:, None], shape)     # (nA, nB, 2) pixels
    b = np.broadcast_to(np.array([c[:2] for c in cand_b], np.int64)[None], shape)
    d = b - a
    norm = np.maximum(0.001, np.sqrt(d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1]))  # integer squares, as the
    ux, uy = d[..., 0] / norm, d[..., 1] / norm                                       # reference's
    xs = np.linspace(a[..., 0], b[..., 0], num=PAF_SAMPLES, axis=-1)      # (nA, nB, PAF_SAMPLES)
    ys = np.linspace(a[..., 1], b[..., 1], num=PAF_SAMPLES, axis=-1)
    rows, cols = np.rint(ys).astype(int), np.rint(xs).astype(int)          # half to even, as Python's round
    along = paf_x[rows, cols] * ux[..., None] + paf_y[rows, cols] * uy[..., None]
    total = np.zeros(along.shape[:2])
    for t in range(PAF_SAMPLES):                                           # summed in order, as Python's sum
        total = total + along[..., t]
    score = total / PAF_SAMPLES + np.minimum(0.5 * image_height / norm - 1, 0)
    aligned = np.count_nonzero(along > PAF_THRESHOLD, axis=-1) > 0.8 * PAF_SAMPLES
    return np.where(aligned & (score > 0), score, np.nan)


def connect_limbs(peaks, pafs: np.ndarray, image_height: int):
    """For each limb, its connections as rows (id of part A, id of part B, score, index in A's list, index in
    B's list), best score first, each candidate used at most once; None where a part has no candidates."""
    connections = []
    for (part_a, part_b), (cx, cy) in zip(LIMBS, PAF_CHANNELS):
        cand_a, cand_b = peaks[part_a], peaks[part_b]
        if not cand_a or not cand_b:
            connections.append(None)
            continue
        scores = limb_scores(pafs[:, :, cx], pafs[:, :, cy], cand_a, cand_b, image_height)
        scored = [(i, j, float(scores[i, j])) for i, j in zip(*np.nonzero(~np.isnan(scores)))]  # (i, j) order
        scored.sort(key=lambda c: c[2], reverse=True)       # stable: ties keep the (i, j) order
        chosen, used_a, used_b = [], set(), set()
        for i, j, score in scored:
            if i not in used_a and j not in used_b:
                chosen.append((cand_a[i][3], cand_b[j][3], score, i, j))
                used_a.add(i)
                used_b.add(j)
                if len(chosen) >= min(len(cand_a), len(cand_b)):
                    break
        connections.append(np.array(chosen, dtype=np.float64).reshape(-1, 5))
    return connections


def group_people(peaks, connections):
    """Join limbs into people, limb by limb in LIMBS order (controlnet_aux's subset building): a limb that
    shares a part with one person extends it; one that touches two disjoint people merges them; one that touches
    nobody starts a new person (except the ear-shoulder limbs). People with fewer than 4 parts or a mean score
    under 0.4 are dropped.

    Returns candidates (N, 4: x, y, score, id) and people (M, 20): the candidate id of each of the 18 parts (-1:
    missing), the total score, the number of parts."""
    candidates = np.array([peak for part in peaks for peak in part], dtype=np.float64).reshape(-1, 4)
    people = -1 * np.ones((0, 20))
    for k, ((part_a, part_b), limbs) in enumerate(zip(LIMBS, connections)):
        if limbs is None:
            continue
        for id_a, id_b, score, _, _ in limbs:
            found = [p for p in range(len(people)) if people[p][part_a] == id_a or people[p][part_b] == id_b][:2]
            if len(found) == 1:
                person = people[found[0]]
                if person[part_b] != id_b:
                    person[part_b] = id_b
                    person[-1] += 1
                    person[-2] += candidates[int(id_b), 2] + score
            elif len(found) == 2:
                first, second = people[found[0]], people[found[1]]
                shared = ((first >= 0).astype(int) + (second >= 0).astype(int))[:-2]
                if not np.any(shared == 2):                 # disjoint: merge the second into the first
                    first[:-2] += second[:-2] + 1          # -1 + (id + 1) where only the second has the part
                    first[-2:] += second[-2:]
                    first[-2] += score
                    people = np.delete(people, found[1], 0)
                else:
                    first[part_b] = id_b
                    first[-1] += 1
                    first[-2] += candidates[int(id_b), 2] + score
            elif k < 17:                                    # the ear-shoulder limbs start nobody
                row = -1 * np.ones(20)
                row[part_a], row[part_b] = id_a, id_b
                row[-1] = 2
                row[-2] = candidates[int(id_a), 2] + candidates[int(id_b), 2] + score
                people = np.vstack([people, row])
    keep = [p for p in range(len(people)) if not (people[p][-1] < 4 or people[p][-2] / people[p][-1] < 0.4)]
    return candidates, people[keep]


# ----------------------------------------------------------------------------------------------------------------
# keypoints: the detections as OpenPose's JSON has them
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Keypoints:
    """The people in an image: each a tuple of 18 (x, y, confidence) in pixels of a width x height canvas, or
    None for a part not found."""
    people: tuple
    width: int
    height: int


def keypoints_from(candidates, people, width: int, height: int) -> Keypoints:
    """The `group_people` arrays as Keypoints."""
    return Keypoints(tuple(tuple(None if index < 0 else tuple(float(v) for v in candidates[index][:3])
                                 for index in person[:18].astype(int)) for person in people), width, height)


def hwc3(image: Image.Image) -> np.ndarray:
    """An RGB uint8 array of any PIL image (controlnet_aux's HWC3): grey repeated, alpha composited on white."""
    if image.mode not in ("RGB", "L", "RGBA"):
        has_alpha = image.mode in ("LA", "PA", "La") or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.shape[2] == 4:
        color = array[:, :, :3].astype(np.float32)
        alpha = array[:, :, 3:].astype(np.float32) / 255.0
        return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return array


def resize_to_resolution(image: np.ndarray, resolution: int) -> np.ndarray:
    """controlnet_aux's resize_image: the short side to `resolution`, both sides rounded to multiples of 64,
    Lanczos-4 when growing, area averaging when shrinking."""
    h, w = image.shape[:2]
    k = resolution / min(h, w)
    height, width = int(np.round(h * k / 64.0)) * 64, int(np.round(w * k / 64.0)) * 64
    if height == 0 or width == 0:
        raise ValueError(f"image of {w}x{h} is too narrow: a side would round to 0 pixels at {resolution}")
    return resize(image, width, height, "lanczos4" if k > 1 else "area")


def detect_keypoints(image: Image.Image, weights=None, detect_resolution: int = 512, net=None) -> Keypoints:
    """The people's body keypoints in `image` (PIL), in pixels of the detection canvas: the image resized so its
    short side is `detect_resolution` (rounded to multiples of 64), as controlnet_aux detects. `weights`: a path
    to body_pose_model.pth, or None to fetch it; `net`: an already loaded BodyPoseNet instead."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image, got {type(image).__name__}")
    rgb = resize_to_resolution(hwc3(image), detect_resolution)
    net = net if net is not None else load_body_pose_model(weights)
    heatmaps, pafs = body_maps(net, np.ascontiguousarray(rgb[:, :, ::-1]))   # the model was trained on BGR
    peaks = find_peaks(heatmaps)
    candidates, people = group_people(peaks, connect_limbs(peaks, pafs, rgb.shape[0]))
    return keypoints_from(candidates, people, rgb.shape[1], rgb.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# drawing
# ----------------------------------------------------------------------------------------------------------------

def draw_pose(people, width: int, height: int) -> np.ndarray:
    """controlnet_aux's draw_bodypose for each person on a black (height, width, 3) uint8 canvas: the first 17
    limbs as filled ellipses (half-length by STICK_WIDTH, OpenCV's 1-degree polygon) in 60% of their colour,
    then each part as a radius-4 disc. `people`: sequences of 18 (x, y[, confidence]) in pixels, or None."""
    canvas = np.zeros((height, width, 3), np.uint8)
    for person in people:
        if len(person) != len(PARTS):
            raise ValueError(f"a person has {len(person)} keypoints; the body model has {len(PARTS)}")
        # as fractions of the canvas and back, the way controlnet_aux stores them (same float rounding)
        points = [None if p is None else (p[0] / float(width), p[1] / float(height)) for p in person]
        for (a, b), color in zip(LIMBS[:17], COLORS):
            if points[a] is None or points[b] is None:
                continue
            xs = np.array([points[a][0], points[b][0]]) * float(width)
            ys = np.array([points[a][1], points[b][1]]) * float(height)
            length = ((ys[0] - ys[1]) ** 2 + (xs[0] - xs[1]) ** 2) ** 0.5
            angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
            polygon = ellipse2poly((int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), STICK_WIDTH), int(angle),
                                   0, 360, 1)
            fill_convex_poly(canvas, polygon, np.array([int(c * 0.6) for c in color], np.uint8))
        for point, color in zip(points, COLORS):
            if point is not None:
                fill_circle(canvas, (int(point[0] * width), int(point[1] * height)), 4, np.array(color, np.uint8))
    return canvas


def openpose(image: Image.Image, weights=None, detect_resolution: int = 512, net=None) -> Image.Image:
    """The OpenPose skeleton image of `image`, the condition of ControlNet's openpose models: what controlnet_aux's
    OpenposeDetector(image) returns (body only), detected and drawn at `detect_resolution`, then brought back to
    the input's size (nearest neighbour, which keeps the colours pure) where the rounding to multiples of 64
    changed it."""
    keypoints = detect_keypoints(image, weights, detect_resolution, net)
    canvas = draw_pose(keypoints.people, keypoints.width, keypoints.height)
    if (keypoints.width, keypoints.height) != image.size:
        canvas = resize(canvas, image.size[0], image.size[1], "nearest")
    return Image.fromarray(canvas)


# ----------------------------------------------------------------------------------------------------------------
# OpenPose's JSON
# ----------------------------------------------------------------------------------------------------------------

def keypoints_to_json(keypoints: Keypoints) -> dict:
    """OpenPose's output format: per person a flat `pose_keypoints_2d` [x, y, c] * 18 in pixels, a missing part
    as 0, 0, 0; the canvas size beside it (as the ControlNet pose editors write it)."""
    people = [{"pose_keypoints_2d": [v for p in person for v in ((0.0, 0.0, 0.0) if p is None else p)]}
              for person in keypoints.people]
    return {"people": people, "canvas_width": keypoints.width, "canvas_height": keypoints.height}


def keypoints_from_json(data, width: int | None = None, height: int | None = None) -> Keypoints:
    """Keypoints from OpenPose's JSON (a dict or its text). A part with confidence 0 is missing. The canvas size
    comes from `canvas_width`/`canvas_height`, else from the arguments."""
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except ValueError as e:
            raise ValueError(f"keypoints are not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("people"), list):
        raise ValueError("keypoints JSON must be an object with a 'people' list (OpenPose's format)")
    width, height = data.get("canvas_width", width), data.get("canvas_height", height)
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise ValueError("keypoints JSON needs positive integer 'canvas_width' and 'canvas_height'")
    people = []
    for n, person in enumerate(data["people"]):
        flat = person.get("pose_keypoints_2d") if isinstance(person, dict) else None
        if not isinstance(flat, list) or len(flat) != 3 * len(PARTS) or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
            raise ValueError(f"person {n}: 'pose_keypoints_2d' must be {3 * len(PARTS)} numbers "
                             f"(x, y, confidence for each of the {len(PARTS)} body parts)")
        people.append(tuple(None if flat[i + 2] == 0 else (float(flat[i]), float(flat[i + 1]), float(flat[i + 2]))
                            for i in range(0, len(flat), 3)))
    return Keypoints(tuple(people), width, height)


def read_keypoints(path, width: int | None = None, height: int | None = None) -> Keypoints:
    """Keypoints from an OpenPose JSON file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read keypoints: {e.strerror}") from None
    try:
        return keypoints_from_json(text, width, height)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def write_keypoints(path, keypoints: Keypoints) -> None:
    """Write keypoints as OpenPose JSON, atomically (a temporary file beside it, then renamed)."""
    fd, tmp = temp_file_beside(path, prefix=".keypoints-", suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(keypoints_to_json(keypoints), f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
