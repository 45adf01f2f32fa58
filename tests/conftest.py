"""Shared test setup. The reference libraries (diffusers, transformers, open_clip, k-diffusion, ldm) are used
offline only: nothing downloads at test time."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("WANDB_MODE", "disabled")


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`): the models
    there are small, per-op overhead dominates, and on a busy 2-core machine a second thread only adds contention
    (measured 10-50x slower). The thread count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(items):
    """The tutorials first, the three longest (test_tutorials_training.py) before the others: they are a third of
    the suite's time in two files, so under tests/run.sh's two workers (one file per worker at a time) each worker
    starts with one of them and then takes the rest, instead of a tutorial file starting last and finishing alone."""
    order = {"test_tutorials_training.py": 0, "test_tutorials.py": 1}
    items.sort(key=lambda item: order.get(item.path.name, 2))       # stable: the rest keeps its order
