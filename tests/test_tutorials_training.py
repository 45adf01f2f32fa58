"""The three longest tutorials (DreamBooth, LoRA, your own photos), run as test_tutorials.py runs the others, from a
file of their own: tests/run.sh's two workers take one file each at a time, so these run beside the other pages."""
import pytest

from test_tutorials import SCRIPTS, TRAINING, figures_in_tmp, run_tutorial  # noqa: F401  (the autouse fixture)


@pytest.mark.parametrize("path", [p for p in SCRIPTS if p.stem in TRAINING], ids=lambda p: p.stem)
def test_training_tutorial_runs_on_the_tiny_model_on_cpu(path, figures_in_tmp, one_thread, monkeypatch):
    run_tutorial(path, figures_in_tmp, monkeypatch)


def test_the_training_tutorials_exist():
    assert sorted(p.stem for p in SCRIPTS if p.stem in TRAINING) == sorted(TRAINING)
