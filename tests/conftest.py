"""Shared test setup. The reference libraries (diffusers, transformers, open_clip, k-diffusion, ldm) are used
offline only: nothing downloads at test time."""
import os
import shutil

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


# ---- disk: the suite writes full-size model files (GBs each); CI's disk is not large --------------------------
# pytest keeps every tmp_path until the session ends, so without this the suite's peak disk is the sum of all its
# files. A passed test's tmp_path is removed when it ends, and what a module's fixtures wrote under the basetemp
# (tmp_path_factory.mktemp) when the module ends; a failed test's files stay, for reading.

_failed_modules = set()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        item.stash[_FAILED] = True
        _failed_modules.add(item.path)
    return report


_FAILED = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
def _remove_tmp_path_of_passed_test(request):
    path = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if path is not None and not request.node.stash.get(_FAILED, False):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _remove_module_files(request, tmp_path_factory):
    """Set up before, so torn down after, the module's own fixtures: what they wrote is no longer read."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    if request.path not in _failed_modules:
        for entry in set(base.iterdir()) - before:
            shutil.rmtree(entry, ignore_errors=True)
