r"""`minisd sweep SPEC.toml`: hyper-parameter search over training runs, on Optuna's studies.

    pip install minisd[sweep]                                # optuna: imported here only, when a sweep runs
    minisd sweep lr.toml                                     # study in lr/ beside the spec: lr/study.db (SQLite)
    minisd sweep lr.toml --storage postgresql://host/db      # several workers on one study
    minisd sweep lr.toml --trials 40                         # run (or extend) to 40 finished trials

A spec (TOML):

    [study]
    name = "tiny-lr"                  # the Optuna study name; default: the spec's file name
    direction = "minimize"            # or "maximize"
    objective = "fid"                 # the key of metrics.json to optimise
    trials = 20                       # finished trials wanted, across all workers and restarts
    seed = 0                          # the sampler's seed (TPE; + the study's length on a restart), and the
                                      # seed of trial n is seed + n
    folder = "runs/tiny-lr"           # default: the spec's name beside it

    [trial]                           # argv lists run in order in the trial's folder; "python" -> this Python
    train = ["python", "-m", "minisd", "train", "finetune", "--data", "/data/shapes", "--out", "{trial_dir}/model",
             "--seed", "{seed}", "--resume"]     # --resume: a retried trial continues from its checkpoint
    eval = ["python", "-m", "minisd", "eval", "--model", "{trial_dir}/model/model.safetensors", "--prompts",
            "/data/shapes/metadata.jsonl", "--num-images", "500", "--out", "{trial_dir}/eval", "--features", "tiny",
            "--ref", "shapes", "--threads", "1"]
    metrics = "{trial_dir}/eval/metrics.json"
    params_to = "train"               # which command gets the sampled parameters as flags (default: the first)

    [params]
    learning_rate = { type = "float", low = 1e-5, high = 1e-3, log = true }
    max_train_steps = { type = "int", low = 100, high = 1000, step = 100 }
    lr_cycles = { type = "int", low = 1, high = 5 }       # `minisd train` takes --lr-cycles
    lr_scheduler = { type = "categorical", choices = ["cosine", "cosine_with_restarts"] }

Each sampled parameter is appended to its command as a flag, underscores turned to dashes: learning_rate = 3e-4
-> `--learning-rate 0.0003`. `{trial_dir}`, `{seed}`, `{trial}` and `{name}` (a parameter's value) may appear in
any argument. A command is any program: the tests sweep a three-line Python script that writes a metrics.json.

Interruption. Every trial is a row of the study's storage (an SQLite file in the sweep folder by default), so a
sweep started again with the same spec loads the study (same name, load_if_exists) and keeps all of it: finished
trials are neither lost nor run again. The trial that was running when the sweep died is stale: its row says
RUNNING, and nothing will ever finish it. Such a trial is marked failed and *retried*: its parameters are queued
again (Optuna's enqueue_trial) and the retry runs in the same trial folder, so a training command that resumes
from its checkpoints (minisd's loop does) loses nothing. When is a RUNNING row stale?
  - default storage: the sweep folder is locked (a file lock) while a sweep runs in it, so the process that holds
    the lock knows that no other worker is alive: every RUNNING row is stale, at once;
  - --storage URL: other workers may be running their trials right now. Each worker writes a heartbeat into its
    running trial (Optuna's RDBStorage heartbeat_interval); a RUNNING trial without a heartbeat for
    HEARTBEAT_GRACE seconds is stale, failed and retried by whichever worker notices (Optuna's fail_stale_trials,
    which runs before each trial).
A trial whose command fails (exit status != 0, or no metrics file) is FAIL and counts as done: it is not
retried, since it would fail again. Ctrl-C (or SIGTERM) stops the running command and leaves the trial to be
retried on the next start.

At the end (and after each trial): trials.csv and trials.md (every trial: number, state, objective, parameters,
folder, seconds), best.json (the best parameters), and objective-vs-parameter plots (plots.png) when matplotlib
is importable (it is not a dependency of minisd; pip install matplotlib).
"""
import contextlib
import csv
import json
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from .folder_lock import folder_lock

HEARTBEAT_INTERVAL = 30      # seconds between a running trial's heartbeats (--storage only)
HEARTBEAT_GRACE = 120        # a RUNNING trial silent for this long is stale (--storage only)
PARAM_TYPES = ("float", "int", "categorical")


class TrialFailed(Exception):
    """A trial's command failed, or left no usable metric: the trial is FAIL (and counts as done)."""


# ---- the spec ----------------------------------------------------------------------------------------------------

def read_spec(path):
    """The spec as a dict with every default filled in; ValueError naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"spec {path} does not exist")
    try:
        spec = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: {e}") from None
    study, trial, params = spec.get("study", {}), spec.get("trial", {}), spec.get("params", {})
    unknown = set(spec) - {"study", "trial", "params"}
    if unknown:
        raise ValueError(f"{path}: unknown section [{sorted(unknown)[0]}]; valid: [study], [trial], [params]")
    if study.get("direction", "minimize") not in ("minimize", "maximize"):
        raise ValueError(f"{path}: study.direction must be 'minimize' or 'maximize'")
    commands = {k: v for k, v in trial.items() if isinstance(v, list)}
    if not commands:
        raise ValueError(f"{path}: [trial] needs at least one command (an argv list such as train = [...])")
    for name, argv in commands.items():
        if not argv or not all(isinstance(a, (str, int, float)) for a in argv):
            raise ValueError(f"{path}: trial.{name} must be a non-empty list of strings")
    if "metrics" not in trial:
        raise ValueError(f"{path}: trial.metrics must name the metrics.json file, "
                         "e.g. '{trial_dir}/eval/metrics.json'")
    params_to = trial.get("params_to", next(iter(commands)))
    if params_to not in commands:
        raise ValueError(f"{path}: trial.params_to is {params_to!r}, not one of the commands {list(commands)}")
    check_objective(path, study.get("objective", "fid"), commands)
    for name, p in params.items():
        if p.get("type") not in PARAM_TYPES:
            raise ValueError(f"{path}: params.{name}.type must be one of {', '.join(PARAM_TYPES)}")
        needed = ("choices",) if p["type"] == "categorical" else ("low", "high")
        missing = [k for k in needed if k not in p]
        if missing:
            raise ValueError(f"{path}: params.{name} needs {missing[0]}")
    return {
        "name": study.get("name", path.stem),
        "direction": study.get("direction", "minimize"),
        "objective": study.get("objective", "fid"),
        "trials": int(study.get("trials", 10)),
        "seed": int(study.get("seed", 0)),
        "folder": Path(path.parent, study.get("folder", path.stem)),
        "commands": commands,
        "metrics": trial["metrics"],
        "params_to": params_to,
        "params": params,
    }


EVAL_NUMBERS = ("is_std", "num_images", "generation_seconds")     # metrics.json's numbers besides the metrics


def check_objective(path, objective, commands):
    """When a command is `minisd eval`, the objective must be a number its metrics.json will hold (its --metrics,
    default fid): a misspelt one fails here, before the first trial, not after every trial has run."""
    for name, argv in commands.items():
        argv = [str(a) for a in argv]
        if not any(a.endswith("minisd") and b == "eval" for a, b in zip(argv, argv[1:])):
            continue
        given = [b for a, b in zip(argv, argv[1:]) if a == "--metrics"]
        given += [a.split("=", 1)[1] for a in argv if a.startswith("--metrics=")]
        metrics = given[-1] if given else "fid"
        if "{" in metrics:                           # a placeholder, known only per trial
            continue
        known = [*metrics.split(","), *EVAL_NUMBERS]
        if objective not in known:
            raise ValueError(f"{path}: study.objective {objective!r} is not a number trial.{name} (minisd eval "
                             f"--metrics {metrics}) writes; choose one of {', '.join(known)}")


def suggest(trial, params):
    """Draw each parameter of the spec from the Optuna trial (a queued retry gets its old values back)."""
    values = {}
    for name, p in params.items():
        if p["type"] == "float":
            values[name] = trial.suggest_float(name, p["low"], p["high"], log=p.get("log", False), step=p.get("step"))
        elif p["type"] == "int":
            values[name] = trial.suggest_int(name, p["low"], p["high"], step=p.get("step", 1), log=p.get("log", False))
        else:
            values[name] = trial.suggest_categorical(name, p["choices"])
    return values


def command_lines(spec, values, trial_dir, seed, number):
    """The argv of each command: placeholders filled, the parameters appended as flags to spec["params_to"]."""
    fill = {"trial_dir": str(trial_dir), "seed": seed, "trial": number, **values}
    lines = {}
    for name, argv in spec["commands"].items():
        argv = [str(a).format(**fill) for a in argv]
        if argv[0] == "python":                      # the Python running the sweep (its environment, its minisd)
            argv[0] = sys.executable
        if name == spec["params_to"]:
            for key, value in values.items():
                argv += ["--" + key.replace("_", "-"), str(value)]
        lines[name] = argv
    return lines


# ---- one trial ---------------------------------------------------------------------------------------------------

def command_env():
    """This process's environment, with the folder holding the running minisd first on PYTHONPATH: a command's
    `python -m minisd`, run in its trial folder, then runs this minisd even from a checkout that is not
    pip-installed (or where another checkout is)."""
    root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


def run_command(argv, cwd, log_path):
    """Run argv with its output appended to log_path; stop it if we are interrupted."""
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=command_env())
        try:
            return proc.wait()
        except BaseException:                        # KeyboardInterrupt, or SIGTERM (raised as one, see main)
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise


def read_objective(path, key):
    try:
        metrics = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise TrialFailed(f"no metrics in {path}: {e}") from None
    value = metrics.get(key)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TrialFailed(f"{path} has no finite number {key!r} (keys: {', '.join(metrics)})")
    return float(value)


def make_objective(spec, log=print):
    def objective(trial):
        folder = trial.user_attrs.get("folder")
        if folder is None:                           # a new trial: its own folder (a retry reuses the old one)
            folder = f"trials/{trial.number:04d}"
            trial.set_user_attr("folder", folder)
        seed = spec["seed"] + int(folder.rsplit("/", 1)[-1])     # a retry keeps the seed of the trial it repeats
        values = suggest(trial, spec["params"])
        trial_dir = (spec["folder"] / folder).resolve()
        trial_dir.mkdir(parents=True, exist_ok=True)
        log(f"trial {trial.number} in {folder}: {values}")
        for name, argv in command_lines(spec, values, trial_dir, seed, trial.number).items():
            status = run_command(argv, trial_dir, trial_dir / "commands.log")
            if status != 0:
                raise TrialFailed(f"{name} exited with status {status} (see {trial_dir / 'commands.log'})")
        metrics = spec["metrics"].format(trial_dir=trial_dir, seed=seed, trial=trial.number, **values)
        return read_objective(trial_dir / metrics, spec["objective"])
    return objective


# ---- stale trials and the count of finished ones -----------------------------------------------------------------

def retried_numbers(trials):
    return {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}


def retry(study, trial):
    """Queue the stale trial's parameters again, to run in its folder (once: not if a retry exists already)."""
    if trial.number in retried_numbers(study.get_trials(deepcopy=False)):
        return
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number,
                                                  "folder": trial.user_attrs.get("folder",
                                                                                 f"trials/{trial.number:04d}")})


def recover(study, everything_stale, log=print):
    """Fail and retry stale trials: every RUNNING one when `everything_stale` (we hold the folder's lock), and
    any FAIL left by an interrupt (user attr "interrupted") that has no retry yet."""
    from optuna.trial import TrialState
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.RUNNING and everything_stale:
            study.tell(t.number, state=TrialState.FAIL)
            log(f"trial {t.number} was running when the sweep stopped: failed, and queued again")
            retry(study, t)
        elif t.state == TrialState.FAIL and t.user_attrs.get("interrupted"):
            retry(study, t)


def finished(trials):
    """Trials that count towards the wanted number: complete ones, and failed ones that were not retried."""
    from optuna.trial import TrialState
    retried = retried_numbers(trials)
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and t.number not in retried and not t.user_attrs.get("interrupted"))]


# ---- the report --------------------------------------------------------------------------------------------------

def write_report(study, spec, log=print):
    """trials.csv, trials.md, best.json, and plots.png when matplotlib is importable."""
    from optuna.trial import TrialState
    folder = spec["folder"]
    trials = study.get_trials(deepcopy=False)
    names = list(spec["params"])
    retried = retried_numbers(trials)
    rows = []
    for t in trials:
        state = t.state.name + (" (retried)" if t.number in retried else "")
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        rows.append([t.number, state, t.value, *[t.params.get(n) for n in names], t.user_attrs.get("folder", ""),
                     None if seconds is None else round(seconds, 1)])
    header = ["trial", "state", spec["objective"], *names, "folder", "seconds"]
    with open(folder / "trials.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    fmt = lambda v: "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)   # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = None
    if complete:
        best = study.best_trial
        lines += ["", f"Best: trial {best.number}, {spec['objective']} = {best.value:.6g}, parameters {best.params}"]
        (folder / "best.json").write_text(json.dumps({"trial": best.number, spec["objective"]: best.value,
                                                      "params": best.params,
                                                      "folder": best.user_attrs.get("folder")}, indent=1) + "\n")
    (folder / "trials.md").write_text("\n".join(lines) + "\n")
    plot(complete, names, spec, folder / "plots.png", log)
    return best


def plot(complete, names, spec, path, log=print):
    """The objective against each parameter, one panel each (only if matplotlib is installed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plots.png (pip install matplotlib)")
        return
    if not complete or not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.scatter([t.params[name] for t in complete], [t.value for t in complete])
        if spec["params"][name].get("log"):
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(spec["objective"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- the command -------------------------------------------------------------------------------------------------

def sweep(spec, storage_url=None, trials=None, log=print):
    """Run the study until `trials` (default: the spec's) trials are finished. Returns the best FrozenTrial."""
    try:
        import optuna
    except ImportError:
        raise ValueError("minisd sweep needs optuna: pip install minisd[sweep]") from None
    from optuna.storages import RDBStorage
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    wanted = spec["trials"] if trials is None else trials
    folder = spec["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    local = storage_url is None
    with folder_lock(folder, "sweep", " (use --storage URL to run several workers)") if local else \
            contextlib.nullcontext():
        if local:
            storage = RDBStorage(f"sqlite:///{(folder / 'study.db').resolve()}")
        else:
            storage = RDBStorage(storage_url, heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=HEARTBEAT_GRACE,
                                 heartbeat_stale_trial_callback=retry)
        study = optuna.create_study(study_name=spec["name"], storage=storage, direction=spec["direction"],
                                    load_if_exists=True)
        # the sampler's random stream goes on from the study's length: seeded afresh with the spec's seed, a
        # restarted sweep would draw its first (random, TPE's startup) parameters again
        study.sampler = optuna.samplers.TPESampler(seed=spec["seed"] + len(study.get_trials(deepcopy=False)))
        recover(study, everything_stale=local, log=log)
        done = len(finished(study.get_trials(deepcopy=False)))
        log(f"study {spec['name']!r}: {done} of {wanted} trials finished")

        def stop_when_done(study, trial):
            if len(finished(study.get_trials(deepcopy=False))) >= wanted:
                study.stop()
            write_report(study, spec, log=lambda *_: None)

        objective = make_objective(spec, log)

        def interruptible(trial):
            try:
                return objective(trial)
            except KeyboardInterrupt:
                trial.set_user_attr("interrupted", True)      # Optuna marks it FAIL: retried on the next start
                raise

        if done < wanted:
            study.optimize(interruptible, n_trials=None, catch=(TrialFailed,), callbacks=[stop_when_done])
        best = write_report(study, spec, log)
    if best is not None:
        log(f"best: trial {best.number}, {spec['objective']}={best.value:.6g}, {best.params}")
    log(f"wrote {folder / 'trials.md'}, {folder / 'trials.csv'}")
    return best
