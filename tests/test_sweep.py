"""`minisd sweep`: a study that survives being killed. The trial command here is a short Python script that logs
its run and writes a metrics.json whose value depends on the parameters, so no training runs."""
import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minisd import cli, sweep

pytest.importorskip("optuna")

FAKE_TRIAL = """
import argparse, json, os, sys, time
p = argparse.ArgumentParser()
p.add_argument("--seed", type=int); p.add_argument("--learning-rate", type=float)
p.add_argument("--max-train-steps", type=int); p.add_argument("--scheduler")
a = p.parse_args()
with open("runs.jsonl", "a") as f:      # one line per run of this trial folder
    f.write(json.dumps(vars(a)) + "\\n")
if os.path.exists(os.environ.get("HANG_FLAG", "-")) and a.seed == 1:
    time.sleep(300)                     # trial 1 hangs until the test kills the sweep
if a.scheduler == "broken":
    sys.exit(3)
value = (a.learning_rate * 1e3 - 0.3) ** 2 + a.max_train_steps / 1000
json.dump({"fid": value, "other": 1.0}, open("metrics.json", "w"))
"""


def write_spec(tmp_path, trials=2, choices=("cosine", "constant")):
    (tmp_path / "fake_trial.py").write_text(FAKE_TRIAL)
    spec = f"""
[study]
name = "test-study"
objective = "fid"
trials = {trials}
seed = 0

[trial]
train = ["python", "{tmp_path / 'fake_trial.py'}", "--seed", "{{seed}}"]
metrics = "metrics.json"

[params]
learning_rate = {{ type = "float", low = 1e-5, high = 1e-3, log = true }}
max_train_steps = {{ type = "int", low = 100, high = 1000, step = 100 }}
scheduler = {{ type = "categorical", choices = {json.dumps(list(choices))} }}
"""
    path = tmp_path / "sweep.toml"
    path.write_text(spec)
    return path


def runs(folder):
    """{trial folder name: [the arguments of each run]}."""
    return {d.name: [json.loads(line) for line in (d / "runs.jsonl").read_text().splitlines()]
            for d in sorted((folder / "trials").iterdir())}


def table(folder):
    with open(folder / "trials.csv") as f:
        return list(csv.DictReader(f))


def test_a_two_trial_sweep_writes_the_table_best_parameters_and_passes_parameters_as_flags(tmp_path):
    spec = sweep.read_spec(write_spec(tmp_path))
    best = sweep.sweep(spec, log=lambda *_: None)
    folder = tmp_path / "sweep"
    rows = table(folder)
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"]
    done = runs(folder)
    assert list(done) == ["0000", "0001"]
    assert [r[0]["seed"] for r in done.values()] == [0, 1]                   # each trial its own seed
    for row, (run,) in zip(rows, done.values()):                            # the flags carried the sampled values
        assert float(row["learning_rate"]) == pytest.approx(run["learning_rate"])
        assert int(row["max_train_steps"]) == run["max_train_steps"]
        assert row["scheduler"] == run["scheduler"]
    best_json = json.loads((folder / "best.json").read_text())
    assert best_json["fid"] == min(float(r["fid"]) for r in rows) == best.value
    assert (folder / "trials.md").read_text().startswith("| trial | state | fid |")
    # the plot is written only where matplotlib is importable (it is no dependency of minisd)
    assert (folder / "plots.png").is_file() == (importlib.util.find_spec("matplotlib") is not None)


def test_a_sweep_run_again_extends_the_study_without_repeating_a_trial(tmp_path):
    spec = sweep.read_spec(write_spec(tmp_path, trials=1))
    sweep.sweep(spec, log=lambda *_: None)
    sweep.sweep(spec, trials=2, log=lambda *_: None)
    assert {k: len(v) for k, v in runs(tmp_path / "sweep").items()} == {"0000": 1, "0001": 1}


def test_a_sweep_killed_mid_trial_continues_without_losing_or_repeating_a_finished_trial(tmp_path):
    spec_path = write_spec(tmp_path, trials=3)
    folder = tmp_path / "sweep"
    flag = tmp_path / "hang"
    flag.write_text("")
    env = {**os.environ, "HANG_FLAG": str(flag)}
    command = [sys.executable, "-m", "minisd", "sweep", str(spec_path)]
    # its own process group, so that the kill takes the running trial command with it (as a lost machine would)
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    hanging = folder / "trials" / "0001" / "runs.jsonl"
    deadline = time.time() + 120
    while not hanging.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert hanging.exists(), proc.communicate()[0].decode()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [r["state"] for r in table(folder)] == ["COMPLETE"]     # written after trial 0; trial 1 never ended

    flag.unlink()
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "trial 1 was running when the sweep stopped" in out.stdout
    rows = table(folder)
    # trial 1 failed as stale and was retried (as trial 2) in its own folder with its own parameters and seed
    assert [r["state"] for r in rows] == ["COMPLETE", "FAIL (retried)", "COMPLETE", "COMPLETE"]
    assert rows[2]["folder"] == "trials/0001"
    done = runs(folder)
    assert {k: len(v) for k, v in done.items()} == {"0000": 1, "0001": 2, "0003": 1}   # trial 0 ran once
    assert done["0001"][0] == done["0001"][1]
    finished = [r for r in rows if r["state"] == "COMPLETE"]
    assert len(finished) == 3                                      # the number asked for
    # the restarted sampler draws new parameters (seeded afresh, it would draw trial 0's again)
    assert len({(r["learning_rate"], r["max_train_steps"], r["scheduler"]) for r in finished}) == 3


def test_a_failing_command_fails_its_trial_which_counts_and_is_not_retried(tmp_path):
    spec = sweep.read_spec(write_spec(tmp_path, trials=2, choices=("broken",)))
    assert sweep.sweep(spec, log=lambda *_: None) is None          # no trial completed: no best
    rows = table(tmp_path / "sweep")
    assert [r["state"] for r in rows] == ["FAIL", "FAIL"]
    assert {k: len(v) for k, v in runs(tmp_path / "sweep").items()} == {"0000": 1, "0001": 1}


@pytest.mark.parametrize("edit, message", [
    (("[trial]", "[trail]"), "unknown section [trail]"),
    (('type = "int"', 'type = "integer"'), "params.max_train_steps.type"),
    (('metrics = "metrics.json"', ""), "trial.metrics"),
    (('objective = "fid"', 'objective = "fid"\ndirection = "down"'), "study.direction"),
])
def test_spec_errors_say_what_is_wrong(tmp_path, capsys, edit, message):
    path = write_spec(tmp_path)
    path.write_text(path.read_text().replace(*edit))
    assert cli.main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_an_objective_missing_from_metrics_json_fails_the_trial_naming_the_keys(tmp_path):
    path = write_spec(tmp_path, trials=1)
    path.write_text(path.read_text().replace('objective = "fid"', 'objective = "clip"'))
    sweep.sweep(sweep.read_spec(path), log=lambda *_: None)
    assert [r["state"] for r in table(tmp_path / "sweep")] == ["FAIL"]
    with pytest.raises(sweep.TrialFailed, match="no finite number 'clip' \\(keys: fid, other\\)"):
        sweep.read_objective(tmp_path / "sweep" / "trials" / "0000" / "metrics.json", "clip")


def test_without_optuna_the_error_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)                # import optuna now raises ImportError
    assert cli.main(["sweep", str(write_spec(tmp_path))]) == 2
    assert capsys.readouterr().err.strip() == "minisd: error: minisd sweep needs optuna: pip install minisd[sweep]"


def test_minisd_imports_without_optuna():
    code = "import sys; sys.modules['optuna'] = None; import minisd.cli, minisd.sweep, minisd.eval"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_python_of_a_command_is_the_sweeps_own(tmp_path):
    spec = sweep.read_spec(write_spec(tmp_path))
    lines = sweep.command_lines(spec, {"learning_rate": 1e-4, "max_train_steps": 200, "scheduler": "cosine"},
                                Path("/t"), seed=5, number=5)
    assert lines["train"] == [sys.executable, str(tmp_path / "fake_trial.py"), "--seed", "5", "--learning-rate",
                              "0.0001", "--max-train-steps", "200", "--scheduler", "cosine"]


def test_a_commands_python_m_minisd_is_the_sweeps_own_minisd_even_from_a_checkout(tmp_path, monkeypatch):
    # the trial runs in its own folder, where `import minisd` would find an installed minisd, or none at all (a
    # checkout run from its root): the sweep puts the running minisd's folder first on the commands' PYTHONPATH
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "elsewhere"))
    code = ("import json, minisd; json.dump(dict(fid=1.0), open('metrics.json', 'w')); "
            "open('where.txt', 'w').write(minisd.__file__)")
    (tmp_path / "spec.toml").write_text(f'[trial]\ntrain = ["python", "-c", {json.dumps(code)}]\n'
                                        'metrics = "metrics.json"\n[study]\ntrials = 1\n')
    sweep.sweep(sweep.read_spec(tmp_path / "spec.toml"), log=lambda *_: None)
    where = (tmp_path / "spec" / "trials" / "0000" / "where.txt").read_text()
    assert Path(where).resolve() == Path(sweep.__file__).resolve().parent / "__init__.py"
    assert sweep.command_env()["PYTHONPATH"].endswith(os.pathsep + str(tmp_path / "elsewhere"))   # kept, after it
