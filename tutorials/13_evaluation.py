"""13. Evaluation: FID on the tiny world's own features; scoring a DreamBooth subject; a hyper-parameter sweep."""
# %% [markdown]
# Tutorials 10 to 12 judged their runs by eye and by a hand-written rule for one subject. A search over training
# settings (learning rate, steps, schedule) needs one number, computed the same way for every run, with no person
# looking. The number the diffusion literature uses is FID, the Fréchet Inception Distance (Heusel et al. 2017):
# run a classifier over the real images and over the generated ones, fit a Gaussian to each set's features (mean
# mu, covariance S), and take the Fréchet distance between the two Gaussians:
#
#     FID = |mu_real - mu_gen|^2 + Tr(S_real + S_gen - 2 (S_real S_gen)^(1/2))
#
# It is 0 when the two sets have the same feature statistics. It grows when the generated images look different
# (the means part) and also when they are too alike (a model that draws one perfect picture has S_gen ~ 0). The
# Inception Score, its predecessor, looks at the generated images alone and so cannot see the second failure.
#
# minisd computes it by hand (minisd/metrics/fid.py, tested equal to pytorch-fid and torchmetrics), together with
# the Inception Score and the CLIP score: `minisd fid A B`, `minisd eval --metrics fid,is,clip`. The features are
# normally Inception-v3's, trained on ImageNet; offline their weights are out of reach, and ImageNet features would
# say little about 64 x 64 pictures of one coloured shape anyway. So the tiny world has its own classifier
# (minisd/metrics/tiny_features.py: 4 conv layers, 128 pooled features, heads for colour, shape and background,
# trained with minisd's own loop), and `--features tiny` computes FID in its features.
#
# ## FID behaves as FID should
# Two independent sets of real images should be at about 0; noise should be far away. How far "about 0" is depends
# on n, the number of images per set: the mean and the covariance are estimated from n samples, and the estimation
# error adds to the distance (on average by about the same amount for every set of that size).

# %%
import contextlib
import csv
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _clock import Clock
from minisd.metrics import fid
from minisd.metrics.tiny_features import load_tiny_features
from minisd.tiny import shapes

torch.set_num_threads(1)            # the tiny networks' tensors are too small for threads to pay
clock = Clock()                     # the machine, and each phase's time (a summary at the end)
net = load_tiny_features()          # the shipped classifier, beside the tiny model in minisd/assets


def real(seed, n):
    """n real images of the tiny world (the stream `seed` of shapes.sample), uint8 (n, 3, 64, 64)."""
    return torch.stack([torch.from_numpy(np.asarray(shapes.sample(seed, i).image).copy()).permute(2, 0, 1)
                        for i in range(n)])


def moments(images):
    return fid.moments(fid.activations(images, net, batch_size=250))      # mu (128,), S (128, 128)


with clock("FID of real and noise images"):
    reference = moments(real(1, 1000))
    real_fids = {n: fid.fid_from_stats(moments(real(2, n)), reference) for n in (32, 128, 1000)}
    noise = torch.randint(0, 256, (1000, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    noise_fid = fid.fid_from_stats(moments(noise), reference)
for n, value in real_fids.items():
    print(f"real images (n = {n:4}) against 1000 other real images: FID {value:6.2f}")
print(f"noise       (n = 1000) against the same 1000 real images: FID {noise_fid:6.2f}")
assert real_fids[1000] < 2 and noise_fid > 20 * real_fids[1000]       # about 0, and far from noise
assert real_fids[32] > real_fids[128] > real_fids[1000]                # the small-n bias

# %% [markdown]
# The small-n bias is why an FID is only compared with FIDs of the same n (and the same reference and features).
# The sweep below scores each run on a few dozen images: its absolute values mean little, its differences between
# runs are what the search uses.
#
# ## FID of a DreamBooth subject
# Tutorial 10 taught the tiny model a diamond under the identifier "sks". To score such a run with FID, the real
# images are pictures of the subject itself: 400 diamonds in the eight colour pairs no instance image had (the same
# pairs tutorial 10 checks), each at a random size and place. `minisd fid --save-stats` summarises them once into a
# statistics file (pytorch-fid's .npz: mu and sigma), which every evaluation then reads. The prompts are the
# identifier's, in the same eight pairs.
#
# `minisd eval` scores a model: it draws image k for prompt k mod 8 with seed k, writes the images, compares their
# tiny features with the reference statistics, and writes metrics.json. The same prompts and seeds for every model:
# the difference between two models' FIDs then comes from the models, not from luck in the draws (common random
# numbers). First the base model, which has never read "sks":

# %%
from _figures import grid, save

from minisd.cli import main
from minisd.tiny import subject

work = Path(tempfile.mkdtemp(prefix="minisd-evaluation-"))


def minisd(*argv):
    """The command line `minisd ARGV`, run in this process; what it printed, the temporary folder shown as WORK."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(list(argv))
    assert status == 0, argv
    return out.getvalue().replace(str(work), "WORK").rstrip()


subject.write_instance_folder(work / "reference", subject.HELD_OUT_COMBOS * 50, seed=1)   # 400 real diamonds
with clock("FID statistics of the real diamonds"):
    print(minisd("fid", str(work / "reference"), "--features", "tiny", "--save-stats", str(work / "diamonds.npz")))
prompts = [subject.instance_prompt(c, b) for c, b in subject.HELD_OUT_COMBOS]
(work / "prompts.txt").write_text("\n".join(prompts) + "\n")
print(prompts[:2], "...")

NUM_IMAGES = 48         # 6 per prompt: enough to rank runs, few enough for a CPU
evaluate = ["eval", "--prompts", str(work / "prompts.txt"), "--num-images", str(NUM_IMAGES), "--features", "tiny",
            "--ref", str(work / "diamonds.npz"), "--no-prepack", "--threads", "1"]
with clock("evaluate, base"):
    printed = minisd(*evaluate, "--out", str(work / "eval-base"))         # no --model: the tiny built-in one
print(printed.splitlines()[-1])                                         # eval prints its metrics last
base_fid = json.loads((work / "eval-base" / "metrics.json").read_text())["fid"]

# %% [markdown]
# ## A hyper-parameter sweep
# Which DreamBooth settings bring that number down? `minisd sweep SPEC.toml` (minisd/sweep.py) searches with
# Optuna: each trial draws settings from the spec's search space, runs the spec's commands in its own folder (a
# DreamBooth run on tutorial 12's eight diamonds and 68 class images, then the `minisd eval` above on the trained
# model), and reads the objective from the metrics.json the last one wrote. Optuna's default sampler, TPE, draws
# the first trials at random and later ones where the good trials so far are denser. The study lives in an SQLite
# file in the sweep's folder: a sweep killed and started again continues it, and `--storage postgresql://...` lets
# workers on several machines share one study.
#
# The search space: the learning rate (log-uniform: as likely between 3e-5 and 6e-5 as between 1.5e-4 and 3e-4),
# the number of steps, and the number of restarts of the cosine schedule (tutorial 10 drew them). Each trial is
# short, a few hundred steps, so that the whole search runs on a CPU in minutes. Every sampled parameter is
# appended to the train command as a flag (`learning_rate` -> `--learning-rate`); `{seed}` and `{trial_dir}` are
# filled in per trial.

# %%
from minisd.pipeline import Pipeline

subject.write_instance_folder(work / "instance")                          # eight diamonds (INSTANCE_COMBOS)
with clock("class images"):
    n_class = subject.write_class_folder(Pipeline.load(None, log=lambda *_: None), work / "class")
print(f"{n_class} class images")

trials = int(os.environ.get("MINISD_TUTORIAL_SWEEP_TRIALS", "3"))
train = ["python", "-m", "minisd", "train", "dreambooth", "--instance-dir", str(work / "instance"),
         "--instance-prompt", subject.instance_prompt("red", "white"),          # each image has its own caption
         "--class-prompt", subject.class_prompt("red", "white"), "--class-dir", str(work / "class"),
         "--num-class-images", str(n_class), "--center-crop", "--lr-scheduler", "cosine_with_restarts",
         "--checkpointing-steps", "100000", "--threads", "1", "--seed", "{seed}", "--out", "{trial_dir}/model"]
spec = f"""
[study]
name = "dreambooth-diamond"
objective = "fid"
direction = "minimize"
trials = {trials}
seed = 0

[trial]
train = {json.dumps(train)}
eval = {json.dumps(["python", "-m", "minisd", *evaluate, "--model", "{trial_dir}/model/model.safetensors",
                    "--out", "{trial_dir}/eval"])}
metrics = "{{trial_dir}}/eval/metrics.json"

[params]
learning_rate = {{ type = "float", low = 3e-5, high = 3e-4, log = true }}
max_train_steps = {{ type = "int", low = 100, high = 300, step = 50 }}
lr_cycles = {{ type = "int", low = 1, high = 5 }}
"""
(work / "sweep.toml").write_text(spec)
print(spec[spec.index("[params]"):])
with clock(f"sweep, {trials} trials"):           # each trial: a train process, then an eval process
    print(minisd("sweep", str(work / "sweep.toml")))
print(f"{trials} trials done")

# %% [markdown]
# The sweep wrote its report into its folder (`sweep.toml` -> `sweep/`): the table of every trial (trials.md,
# trials.csv), the best trial's parameters (best.json), and the objective against each parameter (plots.png).

# %%
folder = work / "sweep"
print((folder / "trials.md").read_text())
best = json.loads((folder / "best.json").read_text())
print("best.json:", best)
save(Image.open(folder / "plots.png"), "13_sweep.png")
with open(folder / "trials.csv") as f:
    done = [row for row in csv.DictReader(f) if row["state"] == "COMPLETE"]
assert len(done) == trials and best["fid"] == min(float(row["fid"]) for row in done)

# %% [markdown]
# Each point of the plot is one trial: its FID against the value that trial drew for each parameter. With a
# handful of trials and three parameters the panels are a sketch, not a law: every point moves in all three at
# once, and an FID on 48 images carries noise of its own (the same seeds in every trial remove the draws' share of
# it, not the training's). Real searches run dozens of trials on more images, and score the best run again with
# other seeds before trusting it (`minisd eval --seed 1000 ...`).
#
# ## The base model against the best trial
# The best trial's images are in its folder already. Beside its FID and the base model's, tutorial 10's hand-written
# rule on the same images: the fraction that are diamonds, by its taper test, in the asked-for colours.

# %%
def drawn(out):
    """[(image, colour, background)] of an evaluation folder: image k is images/p{k mod 8}-s{k}.png."""
    return [(Image.open(out / "images" / f"p{k % 8:05d}-s{k}.png"), *subject.HELD_OUT_COMBOS[k % 8])
            for k in range(NUM_IMAGES)]


models = {"base": (base_fid, drawn(work / "eval-base")),
          f"trial {best['trial']}": (best["fid"], drawn(folder / best["folder"] / "eval"))}
for name, (value, images) in models.items():
    rule = sum(subject.shows_subject(*x) for x in images) / len(images)
    print(f"{name:9}  FID {value:7.2f}   diamonds in the asked-for colours (tutorial 10's rule) {rule:4.0%}")
assert best["fid"] < base_fid                   # the DreamBooth-trained model is nearer the real subject
real_row = [Image.open(work / "reference" / f"diamond-{i:02d}.png") for i in range(8)]    # pairs in prompt order
save(grid([real_row] + [[image for image, _, _ in images[:8]] for _, images in models.values()],
          row_labels=["real", *models], label_width=72), "13_subject.png")

# %% [markdown]
# The rows: the real diamonds of the reference, then what the base model and the best trial draw for the eight
# prompts (seeds 0 to 7). The base model draws squares for "sks", a word it has never read. After a few hundred
# steps the trained model's shapes have left the square, most of them rounded blobs, some still square. Few or none
# pass the rule, which is strict and all-or-nothing, so it cannot tell such short runs apart; FID gives every step
# of progress a little credit, in shape, colours, sizes and places and their spread at once, so a search can follow
# it.
#
# FID is a distance in its network's features, and the network decides what counts as near. The tiny classifier
# has never seen a diamond: its shape head reads the real diamonds as part circle, part triangle, and not at all as
# squares. So a round blob is nearer the reference than an upright square, and a run that draws rounder blobs can
# lower this FID without drawing better diamonds. Look at the best runs' images (or check them with a rule, as
# tutorial 10 does) before trusting the number; Inception's features have blind spots of the same kind.
#
# What the objective leaves out matters as much as what it measures. This FID looks only at the identifier's
# prompts: a run that forgot the rest of its world (tutorial 10's drift and adherence) could still win. A search
# that guards against that scores the class prompts too, e.g. with `minisd eval --metrics adherence` on the base
# model's held-out prompts, and optimises a combination, or keeps only runs that hold their adherence.
#
# The same spec runs on real models: `--model sd15` in the train command, `--features inception --ref coco.npz
# --metrics fid,clip` in the eval command, `--storage` for several GPUs, and `minisd sweep spec.toml --trials 40`
# to extend a finished study.

# %% [markdown]
# ## Where the time went
# Each phase of this page, timed as it ran, on the machine named below (wall time, and this process's CPU time,
# which a busy machine does not inflate; the sweep's CPU time includes its trials' processes):

# %%
clock.summary()
