"""The DreamBooth subjects of minisd/tiny/subject.py: each rule says yes to its own subject, drawn at the instance
sizes anywhere in every colour pair, and no to the world's shapes and to the other subjects; the geometry the rules
rest on (holes, convex hull area) against references written here from their definitions; `minisd tiny-subject`
writes the instance folder tutorial 10 trains on, and refuses a folder that exists."""
import numpy as np
import pytest

from minisd.cli import main
from minisd.tiny import shapes, subject

NEW = ("ring", "cross", "pair")
PAIRS = subject.INSTANCE_COMBOS + subject.HELD_OUT_COMBOS


def drawn(name, n_per_pair=2, seed=0):
    """(image, colour, background) of the subject at instance sizes and random places, every colour pair."""
    rng = np.random.default_rng(seed)
    s = subject.SUBJECTS[name]
    return [(s.draw(c, b, 64, *shapes.placement(rng, *s.scale)), c, b) for c, b in PAIRS for _ in range(n_per_pair)]


@pytest.fixture(scope="module")
def world():
    """48 of the world's training images (all three shapes), as the tiny model learned them."""
    return [shapes.sample(1, i).image for i in range(48)]


@pytest.mark.parametrize("name", NEW + ("diamond",))
def test_each_rule_reads_its_own_subject_and_colours(name):
    assert all(subject.shows_subject(im, c, b, name) for im, c, b in drawn(name))


@pytest.mark.parametrize("name", NEW + ("diamond",))
def test_no_rule_reads_a_subject_in_the_worlds_shapes(name, world):
    assert not any(subject.SUBJECTS[name].judge(im)[2] for im in world)


@pytest.mark.parametrize("name", NEW)
def test_the_new_rules_tell_the_subjects_apart(name):
    """The new subjects' rules say no to every other subject (the diamond's taper rule, older, reads the cross's
    arms as a taper too: it is not asked to tell the cross from a diamond)."""
    for other in subject.SUBJECTS:
        if other != name:
            assert not any(subject.SUBJECTS[name].judge(im)[2] for im, _, _ in drawn(other, 1)), other
    assert not any(subject.is_diamond(im)[2] for other in ("ring", "pair") for im, _, _ in drawn(other, 1))


def test_holes_are_the_enclosed_background():
    y, x = np.mgrid[:40, :40]
    r = np.hypot(y - 19.5, x - 19.5)
    annulus = (r >= 6) & (r <= 15)
    assert (subject.holes(annulus) == (r < 6)).all()
    assert not subject.holes(r <= 15).any()                     # a disc has none
    open_ring = annulus & ~((abs(y - 19.5) < 2) & (x > 19))     # cut through on one side: no longer enclosed
    assert not subject.holes(open_ring).any()


def test_hull_area_of_a_rectangle_and_a_plus():
    """Pixels are unit squares: a filled rectangle is its own hull; a plus of arms k wide and 3k long has the
    octagon (3k)^2 - 4 k^2 / 2 = 7 k^2 as its hull."""
    rect = np.zeros((30, 30), bool)
    rect[3:12, 5:25] = True
    assert subject.hull_area(rect) == 9 * 20
    k = 6
    plus = np.zeros((30, 30), bool)
    plus[2 + k:2 + 2 * k, 2:2 + 3 * k] = True
    plus[2:2 + 3 * k, 2 + k:2 + 2 * k] = True
    assert plus.sum() == 5 * k * k
    assert subject.hull_area(plus) == 7 * k * k


def test_tiny_subject_writes_the_instance_folder(tmp_path, capsys):
    folder = tmp_path / "ring"
    assert main(["tiny-subject", "--subject", "ring", "--instance-dir", str(folder)]) == 0
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == len(subject.INSTANCE_COMBOS)
    for png, (c, b) in zip(pngs, subject.INSTANCE_COMBOS):
        from PIL import Image
        assert png.with_suffix(".txt").read_text() == subject.instance_prompt(c, b)
        assert subject.shows_subject(Image.open(png), c, b, "ring")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["tiny-subject", "--subject", "ring", "--instance-dir", str(folder)]) == 2
    assert "minisd: error:" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before      # left as it was


def test_all_instance_pairs_are_every_pair_but_the_held_out_ones():
    """The recipe's instance pairs: of the 8 x 7 ordered pairs of different colours, all but the 8 held out, so
    each colour is on 7 backgrounds less its held-out pairs as foreground, under 7 foregrounds less those as
    background (white is the held-out background twice, purple never)."""
    combos = subject.ALL_INSTANCE_COMBOS
    assert len(combos) == len(set(combos)) == 8 * 7 - 8
    assert all(c != b and c in shapes.COLOURS and b in shapes.COLOURS for c, b in combos)
    assert not set(combos) & set(subject.HELD_OUT_COMBOS)
    assert set(subject.INSTANCE_COMBOS) <= set(combos)
    for colour in shapes.COLOURS:
        held_fg = sum(c == colour for c, _ in subject.HELD_OUT_COMBOS)
        held_bg = sum(b == colour for _, b in subject.HELD_OUT_COMBOS)
        assert sum(c == colour for c, _ in combos) == 7 - held_fg
        assert sum(b == colour for _, b in combos) == 7 - held_bg


@pytest.mark.parametrize("every", (1, 3))
def test_class_rows_are_the_worlds_training_prompts(every):
    """write_class_folder's captions: every `every`-th training combination (never a held-out one), then 16 empty
    ones; with every 1 (the recipe's class folder) all 56 ordered colour pairs of the world appear."""
    rows = subject.class_rows(every)
    train = shapes.all_combinations(held_out=False)
    captions = [caption for _, caption, _ in rows]
    assert captions[-16:] == [""] * 16
    assert captions[:-16] == [shapes.caption(*x) for x in train[::every]]
    assert len({name for name, _, _ in rows}) == len(rows)
    pairs = {(x[0], x[2]) for x in train[::every]}
    if every == 1:
        assert len(captions) == 156 + 16
        assert pairs == {(c, b) for c in shapes.COLOURS for b in shapes.COLOURS if c != b}


def test_tiny_subject_all_pairs_and_class_every(tmp_path, capsys):
    folder = tmp_path / "cross"
    assert main(["tiny-subject", "--subject", "cross", "--all-pairs", "--instance-dir", str(folder)]) == 0
    captions = sorted(p.read_text() for p in folder.glob("*.txt"))
    assert len(list(folder.glob("*.png"))) == 48
    assert captions == sorted(subject.instance_prompt(c, b) for c, b in subject.ALL_INSTANCE_COMBOS)
    bad = tmp_path / "bad"
    assert main(["tiny-subject", "--subject", "cross", "--class-every", "0", "--instance-dir", str(bad),
                 "--class-dir", str(tmp_path / "class")]) == 2
    assert "minisd: error: --class-every must be >= 1" in capsys.readouterr().err
    assert not bad.exists() and not (tmp_path / "class").exists()
