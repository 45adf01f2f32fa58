"""bench/gpu_check.py, the script a lent GPU runs in one call (issue 32), cannot rot between GPUs: its dry run
(--device cpu --dry-run: the small configs and the tiny model at a few pixels) runs every check here, and the
report it writes as it goes holds one entry per check, in JSON and in Markdown."""
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(BENCH))
    import gpu_check
    yield gpu_check
    sys.path.remove(str(BENCH))


def test_the_dry_run_runs_every_check_and_reports_each(gpu_check, tmp_path, capsys):
    gpu_check.main(["--device", "cpu", "--dry-run", "--out", str(tmp_path), "--scratch", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    names = [e["name"] for e in report["checks"]]
    assert names == list(gpu_check.CHECKS)
    problems = {e["name"]: e.get("traceback", e.get("message")) for e in report["checks"]
                if e["status"] not in ("pass", "skipped")}
    assert not problems, problems
    skipped = {e["name"] for e in report["checks"] if e["status"] == "skipped"}
    # on the CPU only what needs CUDA is skipped: the CUDA-graph, compile, fp16-at-768 px and 8-bit Adam checks
    assert skipped == {n for n in names if "cuda-graph" in n or "compile" in n or "768" in n or "8-bit" in n}
    table = (tmp_path / "gpu_check.md").read_text().splitlines()
    assert [line.split(" | ")[0][2:] for line in table if line.startswith("| ")][1:] == names


def test_a_check_that_no_longer_fits_the_budget_is_recorded_as_skipped(gpu_check, tmp_path):
    gpu_check.main(["--device", "cpu", "--dry-run", "--out", str(tmp_path), "--budget-s", "0", "--only", "LoRA"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [e["name"] for e in report["checks"]] == [n for n in gpu_check.CHECKS if "LoRA" in n]
    assert all(e["status"] == "skipped" and e["message"].startswith("time budget") for e in report["checks"])
