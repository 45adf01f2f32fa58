"""The OpenPose preprocessor against controlnet_aux 0.0.10 (the oracle; never imported by minisd).

No real weights exist here: controlnet_aux's own `bodypose_model` is built at its real config with random weights
(He-scaled, so the heatmaps have many peaks above 0.1), saved as `body_pose_model.pth` in the official key names,
and loaded by both sides. Random weights make scattered parts, not people, so association and drawing are also
checked on synthetic people: heatmaps and PAFs drawn by hand for two skeletons, given to both sides through a
stand-in network, and random keypoint sets drawn by both.
"""
import json
import math

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter as scipy_gaussian_filter
from skimage import data

from minisd.annotators import opencv, openpose as op

controlnet_aux = pytest.importorskip("controlnet_aux")
from controlnet_aux.open_pose import OpenposeDetector, PoseResult, draw_poses  # noqa: E402
from controlnet_aux.open_pose import body as aux_body  # noqa: E402
from controlnet_aux.open_pose import util as aux_util  # noqa: E402
from controlnet_aux.open_pose.body import Body, BodyResult, Keypoint  # noqa: E402
from controlnet_aux.open_pose.model import bodypose_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MAP_TOL = 1e-4      # heatmaps/PAFs: OpenCV's SIMD Lanczos sums float32 in another order (seen: ~2e-6)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = bodypose_model()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 4:                               # He init: activations keep their scale through 6 stages
                p.normal_(0, math.sqrt(2.0 / p[0].numel()))
            else:
                p.normal_(0, 0.01)
    path = tmp_path_factory.mktemp("openpose") / "body_pose_model.pth"
    # the official file's names: controlnet_aux's util.transfer drops the first component (model0., model1_1., ...)
    torch.save({k.split(".", 1)[1]: v for k, v in model.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def body(weights):
    return Body(str(weights))


@pytest.fixture(scope="module")
def net(weights):
    return op.load_body_pose_model(weights)


def astronaut():
    return Image.fromarray(data.astronaut())


# ---------------------------------------------------------------------------------------------------------------
# the network and the maps
# ---------------------------------------------------------------------------------------------------------------

def test_network_outputs_equal_bodypose_model(body, net):
    x = torch.randn(1, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_pafs, ref_heatmaps = body.model(x)
        pafs, heatmaps = net(x)
    assert pafs.shape == (1, 38, 6, 8) and heatmaps.shape == (1, 19, 6, 8)
    torch.testing.assert_close(pafs, ref_pafs, rtol=0, atol=1e-5)         # same convolutions, same order
    torch.testing.assert_close(heatmaps, ref_heatmaps, rtol=0, atol=1e-5)
    assert ref_heatmaps.min() >= 0                                        # the reference's final ReLU is kept


def run_body(body, bgr, monkeypatch):
    """Body(bgr) and the two maps it computes: its last smart_resize calls return the (H, W, 19) heatmaps and
    (H, W, 38) PAFs at image size."""
    maps = {}
    smart_resize = aux_util.smart_resize

    def spy(x, s):
        out = smart_resize(x, s)
        if out.ndim == 3 and out.shape[2] in (19, 38):
            maps[out.shape[2]] = out
        return out

    monkeypatch.setattr(aux_util, "smart_resize", spy)
    candidate, subset = body(bgr)
    return maps[19], maps[38], np.asarray(candidate).reshape(-1, 4), subset


def assert_same_people(candidates, people, ref_candidates, ref_people):
    """Same parts at the same pixels with the same ids, and the same people made of them; scores to MAP_TOL."""
    np.testing.assert_array_equal(candidates[:, [0, 1, 3]], ref_candidates[:, [0, 1, 3]])
    np.testing.assert_allclose(candidates[:, 2], ref_candidates[:, 2], rtol=0, atol=MAP_TOL)
    assert people.shape == ref_people.shape
    np.testing.assert_array_equal(people[:, :18], ref_people[:, :18])
    np.testing.assert_array_equal(people[:, 19], ref_people[:, 19])
    np.testing.assert_allclose(people[:, 18], ref_people[:, 18], rtol=0, atol=10 * MAP_TOL)   # sums of ~20


def test_maps_peaks_and_people_equal_body(body, net, monkeypatch):
    bgr = np.ascontiguousarray(data.astronaut()[:, 176:336, ::-1])        # 512 x 160: a narrow, cheap network input
    ref_heatmaps, ref_pafs, ref_candidates, ref_people = run_body(body, bgr, monkeypatch)
    heatmaps, pafs = op.body_maps(net, bgr)
    np.testing.assert_allclose(heatmaps, ref_heatmaps, rtol=0, atol=MAP_TOL)
    np.testing.assert_allclose(pafs, ref_pafs, rtol=0, atol=MAP_TOL)
    assert heatmaps[:, :, :18].max() > 1                                  # the random net does make peaks

    peaks = op.find_peaks(heatmaps)
    candidates, people = op.group_people(peaks, op.connect_limbs(peaks, pafs, bgr.shape[0]))
    assert len(candidates) > 50 and len(people) > 0                       # plenty to associate
    assert_same_people(candidates, people, ref_candidates, ref_people)


@pytest.mark.parametrize("make_image", [
    pytest.param(astronaut, id="512"),
    pytest.param(lambda: Image.fromarray(data.chelsea()), id="451x300", marks=pytest.mark.slow)])   # ~15 CPU-s
def test_openpose_image_equals_openpose_detector(body, net, make_image):
    """512 x 512 is detected at its own size; 451 x 300 is grown to 768 x 512 (Lanczos), detected and drawn there
    as controlnet_aux does, then returned at the input size (nearest neighbour)."""
    image = make_image()
    ref = np.asarray(OpenposeDetector(body)(image, include_body=True, include_hand=False, include_face=False))
    ours = op.openpose(image, net=net)
    assert ours.mode == "RGB" and ours.size == image.size
    if ref.shape[:2] != (image.height, image.width):
        ref = cv2.resize(ref, image.size, interpolation=cv2.INTER_NEAREST)
    assert ref.any(axis=2).sum() > 5000                                   # skeleton pieces were drawn
    np.testing.assert_array_equal(np.asarray(ours), ref)                  # every pixel


# ---------------------------------------------------------------------------------------------------------------
# association and drawing on real skeletons
# ---------------------------------------------------------------------------------------------------------------

# Three people standing side by side on a 184 x 552 canvas (at 184 px tall the image goes into the network as it
# is). The third has no neck: its arms, legs and head start apart, and the ear-shoulder limbs merge arms and head.
PERSON = ((46, 28), (46, 50), (32, 52), (26, 80), (24, 106), (60, 52), (66, 80), (68, 106), (38, 104), (36, 138),
          (36, 172), (54, 104), (56, 138), (56, 172), (41, 22), (51, 22), (36, 26), (56, 26))
PEOPLE = [PERSON, tuple((x + 200, y) for x, y in PERSON),
          tuple(None if part == 1 else (x + 400, y) for part, (x, y) in enumerate(PERSON))]


def synthetic_maps(people, height=184, width=552):
    """Network-resolution (1/8) heatmaps and PAFs for `people`: a Gaussian blob per part, and along each limb
    its unit vector within 1 cell of the segment (Cao et al. eq. 8)."""
    h, w = height // 8, width // 8
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    heatmaps, pafs = np.zeros((19, h, w)), np.zeros((38, h, w))
    cell = [[p and ((p[0] + 0.5) / 8 - 0.5, (p[1] + 0.5) / 8 - 0.5) for p in person] for person in people]  # px->cell
    for person in cell:
        for part, (cx, cy) in ((part, p) for part, p in enumerate(person) if p):
            heatmaps[part] = np.maximum(heatmaps[part], np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * 0.8 ** 2)))
        for (a, b), (chx, chy) in zip(op.LIMBS, op.PAF_CHANNELS):
            if not (person[a] and person[b]):
                continue
            (ax, ay), (bx, by) = person[a], person[b]
            length = math.hypot(bx - ax, by - ay)
            ux, uy = (bx - ax) / length, (by - ay) / length
            along = (xs - ax) * ux + (ys - ay) * uy
            across = np.abs((xs - ax) * uy - (ys - ay) * ux)
            on = (along >= -0.5) & (along <= length + 0.5) & (across <= 1.0)
            pafs[chx][on], pafs[chy][on] = ux, uy
    heatmaps[18] = 1 - heatmaps[:18].max(0)                               # background
    return torch.tensor(pafs[None], dtype=torch.float32), torch.tensor(heatmaps[None], dtype=torch.float32)


class FixedMaps(torch.nn.Module):
    """A stand-in network that answers every image with the same maps."""

    def __init__(self, pafs, heatmaps):
        super().__init__()
        self.register_buffer("pafs", pafs)
        self.register_buffer("heatmaps", heatmaps)
        self.device_anchor = torch.nn.Parameter(torch.zeros(()))           # Body asks a parameter for the device

    def forward(self, x):
        return self.pafs, self.heatmaps


def test_synthetic_people_are_found_grouped_and_drawn_as_controlnet_aux_does(body, monkeypatch):
    fixed = FixedMaps(*synthetic_maps(PEOPLE))
    monkeypatch.setattr(body, "model", fixed)
    bgr = np.zeros((184, 552, 3), np.uint8)
    _, _, ref_candidates, ref_people = run_body(body, bgr, monkeypatch)

    heatmaps, pafs = op.body_maps(fixed, bgr)
    peaks = op.find_peaks(heatmaps)
    candidates, people = op.group_people(peaks, op.connect_limbs(peaks, pafs, bgr.shape[0]))
    assert_same_people(candidates, people, ref_candidates, ref_people)
    # two whole people; of the neckless one, arms and head merged (3 + 3 + 5 parts), its legs (3 each) dropped
    assert sorted(people[:, 19]) == [11, 18, 18]
    keypoints = op.keypoints_from(candidates, people, 552, 184)
    for found in keypoints.people:                                       # at the parts' pixels, give or take 1
        truth = min(PEOPLE, key=lambda p: abs(p[0][0] - found[0][0]))
        assert all(max(abs(f[0] - t[0]), abs(f[1] - t[1])) <= 1 for f, t in zip(found, truth) if f)

    ref_poses = [PoseResult(BodyResult([None if k is None else Keypoint(k.x / 552, k.y / 184) for k in b.keypoints],
                                       b.total_score, b.total_parts), None, None, None)
                 for b in body.format_body_result(ref_candidates, ref_people)]
    ref_image = draw_poses(ref_poses, 184, 552, draw_body=True, draw_hand=False, draw_face=False)
    np.testing.assert_array_equal(op.draw_pose(keypoints.people, 552, 184), ref_image)


def test_a_part_ties_with_its_neighbours_are_all_peaks():
    """A plateau: every pixel is >= its neighbours (0 outside the map), so each is a peak, as in controlnet_aux
    (no float data elsewhere in these tests has exact ties)."""
    peaks = op.find_peaks(np.full((3, 4, 19), 0.5))
    assert [len(p) for p in peaks] == [12] * 18
    assert peaks[1][:2] == [(0, 0, 0.5, 12), (1, 0, 0.5, 13)]            # row-major, ids counting across parts


def test_draw_pose_equals_draw_bodypose_on_random_keypoints():
    """Random people (parts missing, near and past the borders, tiny and long limbs) on odd canvas sizes."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        width, height = (int(v) for v in rng.integers(40, 300, 2))
        people = []
        for _ in range(int(rng.integers(1, 4))):
            xs, ys = rng.uniform(-10, width + 10, 18), rng.uniform(-10, height + 10, 18)
            if rng.random() < 0.5:                                      # a compact person: short limbs too
                xs, ys = xs[0] + rng.normal(0, 6, 18), ys[0] + rng.normal(0, 6, 18)
            people.append([None if rng.random() < 0.15 else (float(x), float(y), 1.0) for x, y in zip(xs, ys)])
        ref_poses = [PoseResult(BodyResult([None if p is None else Keypoint(p[0] / width, p[1] / height)
                                            for p in person], 0, 0), None, None, None) for person in people]
        ref = draw_poses(ref_poses, height, width, draw_body=True, draw_hand=False, draw_face=False)
        np.testing.assert_array_equal(op.draw_pose(people, width, height), ref)


# ---------------------------------------------------------------------------------------------------------------
# the OpenCV and scipy pieces on their own
# ---------------------------------------------------------------------------------------------------------------

CV2_INTERPOLATION = {"area": cv2.INTER_AREA, "lanczos4": cv2.INTER_LANCZOS4, "nearest": cv2.INTER_NEAREST}


@pytest.mark.parametrize("source, target, method", [
    ((512, 512, 3), (184, 184), "area"),          # the network input: shrink by a non-integer factor
    ((768, 512, 3), (120, 184), "area"),
    ((1024, 1024, 3), (512, 512), "area"),        # whole factors: OpenCV's fast path
    ((700, 512, 3), (512, 704), "area"),          # growing one side under INTER_AREA: its linear fallback
    ((300, 200, 3), (512, 768), "lanczos4"),      # resize_image growing a small input
    ((300, 451, 3), (96, 77), "nearest")])
def test_uint8_resize_equals_cv2(source, target, method):
    image = np.random.default_rng(4).integers(0, 256, source, dtype=np.uint8)
    expected = cv2.resize(image, target, interpolation=CV2_INTERPOLATION[method])
    np.testing.assert_array_equal(opencv.resize(image, *target, method), expected)


@pytest.mark.parametrize("source, target", [((23, 20, 5), (160, 184)), ((184, 160, 5), (512, 445))])
def test_float_lanczos_equals_cv2(source, target):
    maps = np.random.default_rng(5).standard_normal(source).astype(np.float32)
    expected = cv2.resize(maps, target, interpolation=cv2.INTER_LANCZOS4)
    np.testing.assert_allclose(opencv.resize(maps, *target, "lanczos4"), expected, rtol=0, atol=1e-5)


def test_ellipses_and_discs_equal_cv2():
    rng = np.random.default_rng(6)
    for _ in range(300):
        height, width = (int(v) for v in rng.integers(10, 80, 2))
        center = (int(rng.integers(-15, width + 15)), int(rng.integers(-15, height + 15)))
        axes, angle = (int(rng.integers(0, 50)), int(rng.integers(0, 6))), int(rng.integers(-200, 400))
        expected_polygon = cv2.ellipse2Poly(center, axes, angle, 0, 360, 1)
        polygon = opencv.ellipse2poly(center, axes, angle, 0, 360, 1)
        assert polygon == [tuple(p) for p in expected_polygon.tolist()]
        expected, ours = np.zeros((height, width, 3), np.uint8), np.zeros((height, width, 3), np.uint8)
        cv2.fillConvexPoly(expected, expected_polygon, [10, 20, 30])
        opencv.fill_convex_poly(ours, polygon, np.array([10, 20, 30], np.uint8))
        radius = int(rng.integers(0, 7))
        cv2.circle(expected, center, radius, [1, 2, 3], thickness=-1)
        opencv.fill_circle(ours, center, radius, np.array([1, 2, 3], np.uint8))
        np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("mode", ["L", "RGBA", "RGB"])
def test_grey_and_transparent_images_become_rgb_as_hwc3_does(mode):
    rng = np.random.default_rng(8)
    array = rng.integers(0, 256, (6, 5, len(mode)), dtype=np.uint8).squeeze(2) if mode == "L" else \
        rng.integers(0, 256, (6, 5, len(mode)), dtype=np.uint8)
    from controlnet_aux.util import HWC3
    np.testing.assert_array_equal(op.hwc3(Image.fromarray(array, mode)), HWC3(array))


def test_gaussian_filter_equals_scipy():
    image = np.random.default_rng(7).random((40, 30))
    np.testing.assert_array_equal(op.gaussian_filter(image, 3), scipy_gaussian_filter(image, sigma=3))


# ---------------------------------------------------------------------------------------------------------------
# keypoints as OpenPose JSON
# ---------------------------------------------------------------------------------------------------------------

def test_keypoints_json_round_trip_draws_the_same_image(tmp_path):
    people = (tuple((float(x), float(y), 0.9) for x, y in PERSON[:-1]) + (None,), )
    keypoints = op.Keypoints(people, 368, 184)
    path = tmp_path / "pose.json"
    op.write_keypoints(path, keypoints)
    written = json.loads(path.read_text())
    assert set(written) == {"people", "canvas_width", "canvas_height"}
    assert written["people"][0]["pose_keypoints_2d"][:3] == [46.0, 28.0, 0.9]
    assert written["people"][0]["pose_keypoints_2d"][-3:] == [0.0, 0.0, 0.0]     # a missing part
    assert op.read_keypoints(path) == keypoints
    np.testing.assert_array_equal(op.draw_pose(op.read_keypoints(path).people, 368, 184),
                                  op.draw_pose(people, 368, 184))
    assert [p.name for p in tmp_path.iterdir()] == ["pose.json"]                  # no temporary file left


def test_canvas_size_can_come_from_the_caller():
    text = json.dumps({"people": [{"pose_keypoints_2d": [1.0, 2.0, 1.0] * 18}]})
    assert op.keypoints_from_json(text, 64, 32).width == 64
    with pytest.raises(ValueError, match="canvas_width"):
        op.keypoints_from_json(text)


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ('{"canvas_width": 8, "canvas_height": 8}', "'people' list"),
    ('{"people": [{"pose_keypoints_2d": [1, 2, 3]}], "canvas_width": 8, "canvas_height": 8}', "54 numbers"),
    ('{"people": [], "canvas_width": "8", "canvas_height": 8}', "canvas_width")])
def test_malformed_keypoints_json_is_a_one_line_error(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        op.read_keypoints(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


# ---------------------------------------------------------------------------------------------------------------
# bad weights and the download entry
# ---------------------------------------------------------------------------------------------------------------

def test_missing_weights_file_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="no such file") as error:
        op.openpose(astronaut(), weights=tmp_path / "nowhere.pth")
    assert "\n" not in str(error.value)


def test_a_pth_of_another_model_is_a_one_line_error(tmp_path):
    other = tmp_path / "hand_pose_model.pth"
    torch.save({"conv1_1.weight": torch.zeros(64, 3, 3, 3), "conv6_2_CPM.weight": torch.zeros(22, 512, 1, 1)}, other)
    with pytest.raises(ValueError, match="not the OpenPose body model.*conv6_2_CPM") as error:
        op.load_body_pose_model(other)
    assert "\n" not in str(error.value)


def test_the_body_model_is_a_named_download(tmp_path):
    from test_download import TIMEOUT, Hub                            # the hub imitation on 127.0.0.1
    from minisd import download as dl
    payload = b"not really a network" * 1000
    with Hub({"/lllyasviel/Annotators/resolve/main/body_pose_model.pth": payload}) as hub:
        path = dl.fetch_file("openpose-body", cache=tmp_path, endpoint=hub.url, progress=False, timeout=TIMEOUT)
    assert path.read_bytes() == payload and path.name == "body_pose_model.pth"
    assert dl.fetch_file("openpose-body", cache=tmp_path) == path        # cached: no network needed
    with pytest.raises(ValueError, match="unknown file name"):
        dl.fetch_file("openpose-hand", cache=tmp_path)
