"""Live curves: `--report-to tensorboard | wandb` (diffusers' flag; accelerate's trackers, written out).

train_log.jsonl is always written; a tracker gets the same entries as it goes: after each optimizer step the
scalars of the log line (`loss`, `lr`, `lr/text_encoder` when the text encoder has its own group, `seconds`) at
that step, and the validation images at each validation step. Only rank 0 reports (fit.py opens no tracker
elsewhere), so a torchrun job is one run in the tracker.

  tensorboard  event files under OUT/logs/<project>/, through torch.utils.tensorboard's SummaryWriter (the
               `tensorboard` package, an optional extra); `tensorboard --logdir OUT/logs` shows them. A resumed
               run writes with purge_step, so TensorBoard drops the old events of the steps it redoes.
  wandb        a run of the official client (an optional extra) in project <project>, with the run's settings as
               its config, its files under OUT/wandb/; WANDB_MODE=offline keeps it on disk for `wandb sync`. The
               run's id is kept in OUT/logs/wandb-run-id, so a resumed run continues the same wandb run.

<project> is --tracker-project-name, by default the method ("finetune", "dreambooth", ...).
"""
import importlib.util
import os
import uuid

import numpy as np
from PIL import Image

TRACKERS = ("none", "tensorboard", "wandb")
EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb"}       # --report-to: the module it needs


def check(report_to):
    """One-line errors for --report-to, before any model is loaded: an unknown name, or a missing extra."""
    if report_to not in TRACKERS:
        raise ValueError(f"unknown --report-to {report_to!r}; choose one of {', '.join(TRACKERS)}")
    module = EXTRAS.get(report_to)
    if module and importlib.util.find_spec(module) is None:
        raise ValueError(f"--report-to {report_to} needs the {module} package: pip install \"minisd[{module}]\"")


def scalars(entry):
    """The numbers of a log entry but its step: what a tracker plots against the step."""
    return {k: float(v) for k, v in entry.items() if k != "step" and isinstance(v, (int, float))}


class TensorBoard:
    def __init__(self, folder, resume_step=0):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(folder, purge_step=resume_step + 1 if resume_step else None)

    def log(self, entry):
        for k, v in scalars(entry).items():
            self.writer.add_scalar(k, v, entry["step"])

    def images(self, step, prompts, paths):
        for i, (prompt, path) in enumerate(zip(prompts, paths)):
            with Image.open(path) as image:
                self.writer.add_image(f"validation/{i}", np.asarray(image.convert("RGB")), step, dataformats="HWC")
            self.writer.add_text(f"validation/{i}/prompt", prompt, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandB:
    def __init__(self, out, project, config, resume_step=0):
        import wandb
        self.wandb = wandb
        id_file = os.path.join(out, "logs", "wandb-run-id")
        run_id = open(id_file).read().strip() if resume_step and os.path.exists(id_file) else uuid.uuid4().hex[:8]
        os.makedirs(os.path.dirname(id_file), exist_ok=True)
        with open(id_file, "w") as f:
            f.write(run_id)
        # an absolute folder: the client's service process, shared by the runs of one Python process, keeps its
        # own working directory (with a relative `out`, a second run after a chdir left no .wandb file in OUT/wandb)
        self.run = wandb.init(project=project, dir=os.path.abspath(out), config=config, id=run_id, resume="allow")

    def log(self, entry):
        self.run.log(scalars(entry), step=entry["step"])

    def images(self, step, prompts, paths):
        self.run.log({"validation": [self.wandb.Image(p, caption=c) for c, p in zip(prompts, paths)]}, step=step)

    def close(self):
        self.run.finish()


class Nothing:
    """--report-to none."""

    def log(self, entry):
        pass

    def images(self, step, prompts, paths):
        pass

    def close(self):
        pass


class Tracker:
    """The tracker of --report-to for the run folder `out`, opened at the first entry it gets (whose step says
    whether, and from where, the run resumed)."""

    def __init__(self, report_to, out, project, config):
        check(report_to)
        self.report_to, self.out, self.project, self.config = report_to, out, project, config
        self.opened = Nothing() if report_to == "none" else None

    def _open(self, step):
        if self.opened is None:
            if self.report_to == "tensorboard":
                self.opened = TensorBoard(os.path.join(self.out, "logs", self.project), step - 1)
            else:
                self.opened = WandB(self.out, self.project, self.config, step - 1)
        return self.opened

    def log(self, entry):
        self._open(entry["step"]).log(entry)

    def images(self, step, prompts, paths):
        self._open(step).images(step, prompts, paths)

    def close(self):
        if self.opened is not None:
            self.opened.close()
