"""The procedural shapes dataset and the non-learned judge that scores the tiny model."""
import json

import numpy as np
from PIL import Image

from minisd.tiny import shapes


def test_samples_are_a_pure_function_of_seed_and_index():
    a, b, c = shapes.sample(3, 17), shapes.sample(3, 17), shapes.sample(4, 17)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.text == b.text
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_stream_resumes_exactly_from_an_index():
    full = shapes.stream(seed=1)
    first = [next(full) for _ in range(6)]
    resumed = shapes.stream(seed=1, start=4)
    assert [s.text for s in first[4:]] == [next(resumed).text for _ in range(2)]


def test_caption_form_and_held_out_split():
    train = set(shapes.all_combinations(held_out=False))
    held = set(shapes.all_combinations(held_out=True))
    assert held == set(shapes.HELD_OUT) and not train & held
    assert len(train) + len(held) == 8 * 7 * 3
    # every colour appears as foreground and background, and every shape, in training
    assert {c for c, _, _ in train} == set(shapes.COLOURS) == {b for _, _, b in train}
    assert {s for _, s, _ in train} == set(shapes.SHAPES)
    for i in range(200):
        s = shapes.sample(0, i)
        assert (s.colour, s.shape, s.background) in train
        assert s.text == f"a {s.colour} {s.shape} on a {s.background} background"
    s = shapes.sample(0, 0, held_out=True)
    assert (s.colour, s.shape, s.background) in held


def test_image_folder_layout(tmp_path):
    shapes.write_image_folder(tmp_path, n=5, seed=2)
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and set(rows[0]) == {"file_name", "text"}
    for row, i in zip(rows, range(5)):
        assert row["text"] == shapes.sample(2, i).text
        assert Image.open(tmp_path / row["file_name"]).size == (64, 64)


def test_judge_reads_the_ground_truth_of_every_generated_sample():
    # The judge must be right on the data itself before it can grade a model; measured: 600 / 600.
    n = 600
    right = sum(shapes.agrees(s.image, s.colour, s.shape, s.background)
                for s in (shapes.sample(9, i) for i in range(n)))
    assert right == n


def test_judge_can_fail():
    s = shapes.draw("red", "circle", "blue")
    assert shapes.judge(s) == ("red", "circle", "blue")
    assert not shapes.agrees(s, "red", "square", "blue")
    assert not shapes.agrees(s, "orange", "circle", "blue")
    blank = Image.new("RGB", (64, 64), shapes.COLOURS["white"])
    assert shapes.judge(blank) == (None, None, "white")


def test_judge_reads_the_shape_not_specks_near_the_edge():
    # a decoder's edge artefacts: a 2x6 speck of foreground-like colour far from the shape must not stretch the
    # shape's bounding box (it would turn the circle into a "triangle")
    image = np.array(shapes.draw("red", "circle", "blue", scale=0.5))
    image[60:62, 50:56] = shapes.COLOURS["red"]
    assert shapes.judge(Image.fromarray(image)) == ("red", "circle", "blue")
    mask = np.zeros((5, 5), bool)
    mask[0, 0] = mask[2:5, 2:5] = True
    assert shapes.largest_region(mask).sum() == 9 and not shapes.largest_region(mask)[0, 0]


def test_mislabel_changes_exactly_one_attribute_and_stays_in_training():
    rng = np.random.default_rng(0)
    changed = set()
    for combo in shapes.all_combinations(held_out=False):
        for _ in range(6):
            wrong = shapes.mislabel(*combo, rng=rng)
            differs = [a != b for a, b in zip(wrong, combo)]
            assert sum(differs) == 1 and wrong[0] != wrong[2]
            assert wrong in shapes.all_combinations(held_out=False)    # never leaks a held-out combination
            changed.add(differs.index(True))
    assert changed == {0, 1, 2}                                        # colour, shape and background all occur


def test_pictures_of_any_width_and_height():
    # a square size given as (w, h) is the square picture; the shape keeps its proportions in landscape and
    # portrait pictures (scale is a fraction of the shorter side) and the judge reads it there too
    assert np.array_equal(np.asarray(shapes.draw("red", "circle", "blue", 64)),
                          np.asarray(shapes.draw("red", "circle", "blue", (64, 64))))
    for size in ((96, 64), (64, 96), (150, 100)):
        for i in range(40):
            s = shapes.sample(4, i, size=size)
            assert s.image.size == size
            assert shapes.agrees(s.image, s.colour, s.shape, s.background), (size, i, s.text)
        wide = np.asarray(shapes.draw("black", "square", "white", size, scale=0.5)).min(axis=2) < 128
        ys, xs = np.nonzero(wide)
        assert xs.max() - xs.min() + 1 == ys.max() - ys.min() + 1 == min(size) // 2     # a square stays square
