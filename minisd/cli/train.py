"""The training commands: `minisd train finetune | dreambooth | textual-inversion | lora | controlnet`, `minisd
train-tiny`, `minisd train-tiny-features`, `minisd train-tiny-captioner`, `minisd train-tiny-controlnet`, `minisd
tiny-subject` (a DreamBooth subject's folders) and `minisd sweep`. Argument parsing only (diffusers' flag names,
with dashes): each `minisd train` flag fills the field of the same name of the method's config (a
train.settings.TrainSettings with the method's own fields), whose defaults are the flags' defaults;
minisd.train.run(config) does the rest, as it does from Python."""
import argparse
import dataclasses
import signal
import sys
from dataclasses import replace

import torch

from .. import distributed, sweep
from ..train import (controlnet, dreambooth, finetune, lora, loop, report, run, textual_inversion, tiny,
                     tiny_captioner, tiny_controlnet, tiny_features)
from ..train.settings import SAVE_FORMATS, SCHEDULERS
from .help import DefaultsFormatter

METHODS = {"finetune": finetune, "dreambooth": dreambooth, "textual-inversion": textual_inversion, "lora": lora,
           "controlnet": controlnet}

# Command lines pasted from diffusers' READMEs (train_dreambooth.py, train_text_to_image.py, textual_inversion.py,
# train_dreambooth_lora.py): every flag also answers to its underscore spelling (--train_batch_size), and these of
# diffusers' names are ours under another name
DIFFUSERS_NAMES = {
    "--pretrained-model-name-or-path": "--model", "--output-dir": "--out", "--instance-data-dir": "--instance-dir",
    "--class-data-dir": "--class-dir", "--train-data-dir": "--data", "--lr-num-cycles": "--lr-cycles",
    "--placeholder-token": "--token", "--initializer-token": "--init-token",
    "--controlnet-model-name-or-path": "--controlnet",
}
# diffusers' flags that minisd does not have: refused with a line saying why, never ignored
NOT_SUPPORTED = {
    "--push-to-hub": "minisd does not upload; the run folder holds the files to upload",
    "--hub-token": "minisd does not upload", "--hub-model-id": "minisd does not upload",
    "--validation-epochs": "use --validation-steps", "--logging-dir": "the logs go to OUT/logs (--report-to)",
    "--enable-xformers-memory-efficient-attention": "minisd's attention is torch's SDPA already",
    "--allow-tf32": "not a training flag in minisd", "--dataloader-num-workers": "minisd's batches are read in turn",
    "--revision": "--model takes a file or folder", "--variant": "--model takes a file or folder",
    "--tokenizer-name": "the tokenizer is the model's own", "--local-rank": "torchrun sets LOCAL_RANK",
    "--resume-from-checkpoint": "use --resume (the latest checkpoint in OUT/checkpoints/)",
}


class TrainParser(argparse.ArgumentParser):
    """The parser of `minisd train METHOD`: diffusers' spellings are read as ours (DIFFUSERS_NAMES, underscores),
    and each flag it does not know is one line naming it (with why, for NOT_SUPPORTED), not the usage text. Its help
    shows each flag's default."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=DefaultsFormatter, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        given = sys.argv[1:] if args is None else args
        converted = [ours(a) for a in given]
        spelled = dict(zip(converted, given))               # to name a flag as the user wrote it
        namespace, rest = super().parse_known_args(converted, namespace)
        lines = []                                  # every such flag at once: a pasted command is fixed in one go
        for a in rest:
            if a.startswith("--"):
                flag = a.split("=", 1)[0]
                why = NOT_SUPPORTED.get(flag, f"{self.prog} has no such flag ({self.prog} --help lists them)")
                lines.append(f"minisd: error: {spelled[a].split('=', 1)[0]} is not supported: {why}\n")
        if lines:
            self.exit(2, "".join(lines))
        return namespace, rest

    def error(self, message):
        self.exit(2, f"minisd: error: {message}\n")


def ours(arg):
    """--output_dir=x -> --out=x: a flag in minisd's spelling; anything else as it is."""
    if not arg.startswith("--"):
        return arg
    flag, eq, value = arg.partition("=")
    flag = "--" + flag[2:].replace("_", "-")
    return DIFFUSERS_NAMES.get(flag, flag) + eq + value


def _common(p, d, save_formats=SAVE_FORMATS, writes="model.safetensors"):
    """The flags of settings.TrainSettings, with the defaults of `d`, the method's config; `writes`: what the
    method writes into --out; save_formats None: it has one way to save (no --save-format)."""
    p.add_argument("--out", required=True, help=f"run folder: {writes}, train_log.jsonl, checkpoints/, samples/, "
                                                "args.json")
    p.add_argument("--model", default=None, help="file, diffusers folder, sd15 | sd21 | sd21-base, Hugging Face "
                   "owner/repo[/file.safetensors]; default: tiny")
    p.add_argument("--resolution", type=int, default=None, help="training side in pixels (default: the model's)")
    p.add_argument("--train-batch-size", type=int, default=d.train_batch_size)
    p.add_argument("--gradient-accumulation-steps", type=int, default=d.gradient_accumulation_steps)
    p.add_argument("--max-train-steps", type=int, default=None,
                   help=f"optimizer steps (default {d.max_train_steps}; wins over --num-train-epochs, as in diffusers)")
    p.add_argument("--num-train-epochs", type=int, default=None,
                   help="instead of --max-train-steps: steps from the data's size (the log says how many)")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    if not isinstance(d, textual_inversion.TextualInversionConfig):
        p.add_argument("--unet-lr", type=float, default=None,
                       help="the U-Net's rate (or its LoRA's; default --learning-rate)")
        p.add_argument("--text-encoder-lr", type=float, default=None,
                       help="the text encoder's rate with --train-text-encoder, its own parameter group "
                            "(default: the U-Net's)")
    p.add_argument("--scale-lr", action="store_true", default=d.scale_lr, help="learning rate x train batch size "
                   "(per process) x gradient accumulation steps x processes, as diffusers' --scale_lr")
    p.add_argument("--lr-scheduler", default=d.lr_scheduler, choices=SCHEDULERS)
    p.add_argument("--lr-warmup-steps", type=int, default=d.lr_warmup_steps)
    p.add_argument("--lr-cycles", type=float, default=None,
                   help="cosine: periods (default 0.5); cosine_with_restarts: restarts (default 1)")
    p.add_argument("--lr-min-ratio", type=float, default=d.lr_min_ratio, help="floor of the decay, fraction of lr")
    p.add_argument("--lr-power", type=float, default=d.lr_power, help="the polynomial schedule's exponent")
    p.add_argument("--adam-beta1", type=float, default=d.adam_beta1)
    p.add_argument("--adam-beta2", type=float, default=d.adam_beta2)
    p.add_argument("--adam-weight-decay", type=float, default=d.adam_weight_decay)
    p.add_argument("--adam-epsilon", type=float, default=d.adam_epsilon)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping (0: none)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--train-text-encoder", action="store_true")
    p.add_argument("--mixed-precision", default=d.mixed_precision, choices=("no", "fp16", "bf16"))
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    p.add_argument("--use-ema", action="store_true", help="save an EMA of the weights")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="the EMA's decay (default %(default)s)")
    p.add_argument("--use-8bit-adam", action="store_true", help="bitsandbytes' AdamW8bit (CUDA only)")
    p.add_argument("--snr-gamma", type=float, default=None, help="Min-SNR weighting (Hang et al. 2023); 5 is usual")
    p.add_argument("--noise-offset", type=float, default=d.noise_offset)
    p.add_argument("--center-crop", action="store_true", help="centre crops (default: random crops)")
    p.add_argument("--random-flip", action="store_true", default=d.random_flip)
    p.add_argument("--cache-latents", action="store_true", help="encode each image once (needs --center-crop)")
    p.add_argument("--checkpointing-steps", type=int, default=d.checkpointing_steps,
                   help="write the resumable checkpoint every N steps, and always at the last step")
    p.add_argument("--checkpoints-total-limit", type=int, default=None,
                   help="resumable checkpoints kept in OUT/checkpoints/ (default: the latest only)")
    p.add_argument("--save-model-steps", type=int, default=None, metavar="N",
                   help="a snapshot of the output every N steps (OUT/model-step000400.safetensors, ...)")
    p.add_argument("--save-last-n", type=int, default=None, metavar="K", help="keep the newest K snapshots")
    p.add_argument("--report-to", default=d.report_to, choices=report.TRACKERS,
                   help="live curves and validation images: tensorboard (OUT/logs/) or wandb (optional extras)")
    p.add_argument("--tracker-project-name", default=None, help="the tracker's project (default: the method)")
    p.add_argument("--validation-prompt", action="append", default=[], dest="validation_prompts",
                   help="repeatable; images go to OUT/samples/")
    p.add_argument("--validation-steps", type=int, default=d.validation_steps)
    p.add_argument("--num-validation-images", type=int, default=d.num_validation_images,
                   help="images per validation prompt, seeds --seed, --seed + 1, ...")
    p.add_argument("--device", default=d.device, choices=("auto", "cuda", "cpu", "mps"))
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is fastest for the tiny model on a busy machine)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in OUT/checkpoints/")
    if save_formats:
        p.add_argument("--save-format", default=d.save_format, choices=save_formats)
    g = p.add_argument_group("data folders and captions (kohya-ss/sd-scripts' names)")
    g.add_argument("--caption-extension", default=d.caption_extension,
                   help="caption files beside the images: NAME%(default)s (kohya's other name: .caption)")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="skip images that cannot be decoded, with a note (default: an error naming the first)")
    g.add_argument("--caption-dropout-rate", type=float, default=d.caption_dropout_rate,
                   help="probability of training an example with an empty caption")
    g.add_argument("--shuffle-caption", action="store_true", help="shuffle the comma-separated tags of a caption")
    g.add_argument("--keep-tokens", type=int, default=d.keep_tokens,
                   help="the first N tags stay first, in place (not shuffled, not dropped)")
    g.add_argument("--caption-tag-dropout-rate", type=float, default=d.caption_tag_dropout_rate,
                   help="probability of leaving out each tag (but the kept ones)")
    g = p.add_argument_group("aspect-ratio buckets (kohya-ss/sd-scripts' algorithm and names)")
    g.add_argument("--enable-bucket", action="store_true",
                   help="train each image at the bucket of its aspect ratio (area about --resolution squared) "
                        "instead of a square crop; every batch from one bucket")
    g.add_argument("--min-bucket-reso", type=int, default=d.min_bucket_reso, help="default %(default)s")
    g.add_argument("--max-bucket-reso", type=int, default=d.max_bucket_reso, help="default %(default)s")
    g.add_argument("--bucket-reso-steps", type=int, default=d.bucket_reso_steps,
                   help="bucket sides are multiples of this (a multiple of 8; default %(default)s)")
    g.add_argument("--bucket-no-upscale", action="store_true",
                   help="a bucket per image size, never enlarging (min and max are then ignored)")


def add_train(parser):
    sub = parser.add_subparsers(dest="method", required=True, parser_class=TrainParser)
    f = sub.add_parser("finetune", help="full fine-tuning on a folder of captioned images")
    f.add_argument("--data", default=None, help="images with NAME.txt captions or a metadata.jsonl, or kohya's "
                                                "N_prompt subfolders of them")
    d = finetune.FinetuneConfig(out="")
    _dataset_flags(f, d)
    _common(f, d)
    b = sub.add_parser("dreambooth", help="DreamBooth, optionally with prior preservation")
    b.add_argument("--instance-dir", required=True, help="the subject's images, or kohya's N_prompt subfolders")
    b.add_argument("--instance-prompt", default=None, help="their caption (not needed in kohya's layout)")
    d = dreambooth.DreamBoothConfig(out="")
    _class_flags(b, d)
    _common(b, d)
    t = sub.add_parser("textual-inversion", help="Textual Inversion: a new word's vectors, the model frozen")
    d = textual_inversion.TextualInversionConfig(out="")
    t.add_argument("--data", default=None, help="images of the concept (captions naming --token optional)")
    _dataset_flags(t, d, "(default: text if the dataset has it, else template prompts)")
    t.add_argument("--token", required=True, help="the new word, e.g. \"<cat-toy>\"")
    t.add_argument("--init-token", required=True, help="a one-token word the vectors start from, e.g. toy")
    t.add_argument("--num-vectors", type=int, default=d.num_vectors, help="vectors the word stands for")
    t.add_argument("--learnable-property", default=d.learnable_property, choices=textual_inversion.PROPERTIES,
                   help="template prompts for images without captions")
    t.add_argument("--no-scale-lr", action="store_false", dest="scale_lr", help="(--scale-lr is on by default)")
    t.add_argument("--no-random-flip", action="store_false", dest="random_flip", help="(flips are on by default)")
    _common(t, d, None, "learned_embeds.safetensors (diffusers) and TOKEN.safetensors (A1111)")
    r = sub.add_parser("lora", help="a LoRA (low-rank change of the weights), on captioned images or DreamBooth's")
    d = lora.LoRAConfig(out="")
    r.add_argument("--data", default=None, help="images with captions, as for finetune; or --dataset-name or "
                                                "--instance-dir ...")
    _dataset_flags(r, d)
    r.add_argument("--instance-dir", default=None, help="DreamBooth-LoRA: the subject's images")
    r.add_argument("--instance-prompt", default=None)
    _class_flags(r, d)
    r.add_argument("--rank", type=int, default=d.rank, help="r, the factors' inner size")
    r.add_argument("--alpha", type=float, default=d.alpha, help="the change is scaled by alpha / r")
    r.add_argument("--lora-targets", default=d.lora_targets,
                   help="default: kohya's (the U-Net transformers' Linear / 1x1 conv layers, the text encoder's "
                        "attention and MLP); attention: diffusers' (q, k, v, out)")
    _common(r, d, lora.SAVE_FORMATS, "OUT_NAME.safetensors (kohya) or pytorch_lora_weights.safetensors (diffusers)")
    c = sub.add_parser("controlnet", help="a ControlNet, on images with conditioning images; the model frozen")
    d = controlnet.ControlNetConfig(out="")
    c.add_argument("--data", default=None, help="NAME.png with NAME.cond.png (its conditioning image) and "
                                                "NAME.txt, or a metadata.jsonl of image, conditioning_image, text; "
                                                "or --dataset-name")
    _dataset_flags(c, d)
    c.add_argument("--conditioning-image-column", default=d.conditioning_image_column,
                   help="--dataset-name's column of conditioning images (default: %(default)s)")
    c.add_argument("--controlnet", default=None, help="a ControlNet file or folder to start from (default: the "
                                                      "U-Net's encoder with zero convolutions)")
    c.add_argument("--validation-image", action="append", default=[], dest="validation_images",
                   help="the conditioning image of the validation samples: one per --validation-prompt, or one")
    _common(c, d, SAVE_FORMATS, "controlnet.safetensors (ControlNet 1.1 layout) or the diffusers folder "
                                "controlnet/")


def _dataset_flags(p, d, caption_default="(default: %(default)s)"):
    """A Hugging Face dataset instead of --data (finetune, lora, textual-inversion, controlnet; train.hf_dataset)."""
    p.add_argument("--dataset-name", default=None, metavar="NAME_OR_PATH",
                   help="a Hugging Face dataset instead of --data: a Hub name, a save_to_disk folder, parquet "
                        "file(s) or an image folder with metadata.jsonl (needs pip install -e \".[datasets]\")")
    p.add_argument("--dataset-config-name", default=None, help="the Hub dataset's configuration, if it has several")
    p.add_argument("--dataset-split", default=d.dataset_split, help="(default: %(default)s)")
    p.add_argument("--image-column", default=d.image_column, help="(default: %(default)s)")
    p.add_argument("--caption-column", default=d.caption_column,
                   help="strings, or lists of strings (one drawn per use) " + caption_default)


def _class_flags(p, d):
    """DreamBooth's prior preservation (dreambooth and lora)."""
    p.add_argument("--class-prompt", default=None, help="turns on prior preservation")
    p.add_argument("--with-prior-preservation", action="store_true",
                   help="(diffusers' flag: prior preservation is on with --class-prompt; this checks that it is)")
    p.add_argument("--class-dir", default=None, help="class images, generated there until --num-class-images")
    p.add_argument("--reg-data-dir", default=None,
                   help="kohya's name: existing class images (none generated), a folder or N_prompt subfolders")
    p.add_argument("--num-class-images", type=int, default=d.num_class_images)
    p.add_argument("--sample-batch-size", type=int, default=d.sample_batch_size,
                   help="class images per generate call (each is its seed's alone; default %(default)s)")
    p.add_argument("--prior-loss-weight", type=float, default=d.prior_loss_weight)


def config_from_args(args, log=print):
    method = METHODS[args.method]
    fields = {f.name for f in dataclasses.fields(method.config)}              # the method's config class
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["validation_prompts"] = tuple(values.get("validation_prompts", ()))
    if "validation_images" in values:
        values["validation_images"] = tuple(values["validation_images"])
    if values.get("max_train_steps") is None:
        del values["max_train_steps"]       # the method's default, or the steps of --num-train-epochs
    elif values.get("num_train_epochs") is not None:
        log(f"--max-train-steps {values['max_train_steps']} wins over --num-train-epochs "
            f"{values['num_train_epochs']} (as in diffusers)")
        values["num_train_epochs"] = None
    return method.config(**values)          # with the method's defaults for what has no flag


def run_train(args):
    if args.threads:                # not a config field: it is how the run is computed, not what it trains
        torch.set_num_threads(args.threads)
    try:
        run(config_from_args(args))            # minisd.train.run: the Python API's run
    except loop.Stopped as e:
        return _stopped(e, "run the same command with --resume to continue")


def _stopped(e, how_to_continue):
    """SIGTERM, SIGUSR1 (SLURM), Ctrl-C: a checkpoint is written; one line and the usual status, 128 + signal."""
    if distributed.is_main():
        print(f"minisd: {e}: {how_to_continue}", file=sys.stderr)
    return 128 + e.signum


def add_train_tiny(p):
    p.add_argument("--out", required=True, help="run folder: checkpoints, sample grids, log.jsonl, the weights")
    d = tiny.Recipe()
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--vae-steps", type=int, default=d.vae_steps)
    p.add_argument("--steps", type=int, default=d.steps, help="text encoder + U-Net steps")
    p.add_argument("--bank-size", type=int, default=d.bank_size)
    p.add_argument("--sample-every", type=int, default=d.sample_every)
    p.add_argument("--caption-noise", type=float, default=d.caption_noise)
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads (use 1 on a busy machine: OpenMP threads that wait for each other lose)")
    p.add_argument("--device", default="cpu", help="cpu (how the shipped weights were made) or cuda")
    p.add_argument("--report-to", default="none", choices=report.TRACKERS,
                   help="the four phases' curves as one run: tensorboard (OUT/logs/tiny/) or wandb")


def run_train_tiny(args):
    torch.set_num_threads(args.threads)
    recipe = replace(tiny.Recipe(), seed=args.seed, vae_steps=args.vae_steps, steps=args.steps,
                     bank_size=args.bank_size, sample_every=args.sample_every, caption_noise=args.caption_noise)
    try:
        tiny.train_tiny(args.out, recipe, args.device, report_to=args.report_to)
    except loop.Stopped as e:       # the recipe picks up OUT's checkpoints by itself: it has no --resume
        return _stopped(e, "run the same command to continue")


def add_tiny_subject(p):
    from ..tiny import subject
    p.add_argument("--subject", required=True, choices=tuple(subject.SUBJECTS),
                   help="the shape (minisd/tiny/subject.py)")
    p.add_argument("--instance-dir", required=True, help="new folder: the instance images, each with NAME.txt")
    p.add_argument("--class-dir", help="new folder: prior preservation's class images, the base model's own "
                                       "(subject.write_class_folder; its count is --num-class-images)")
    p.add_argument("--all-pairs", action="store_true",
                   help="instance images in all 48 colour pairs but the held-out ones (subject.ALL_INSTANCE_COMBOS; "
                        "the recipe for any subject) instead of the 8 of subject.INSTANCE_COMBOS")
    p.add_argument("--class-every", type=int, default=3, metavar="N",
                   help="the class folder: every N-th training combination of the world (1: all 156, every colour "
                        "pair; the recipe for any subject), plus 16 for the empty prompt (default %(default)s: 52)")
    p.add_argument("--seed", type=int, default=0, help="the instance images' sizes and places")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for the class images")


def run_tiny_subject(args):
    """Writes each folder whole or not at all (train.loop.atomic_write_folder: drawn into a temporary folder
    beside it, renamed when complete); an existing folder is refused, never added to."""
    import os

    from ..model import load_model, tiny_model_path
    from ..pipeline import Pipeline
    from ..tiny import subject
    from ..train.loop import atomic_write_folder
    if args.class_every < 1:
        raise ValueError(f"--class-every must be >= 1, got {args.class_every}")
    for folder in (args.instance_dir, args.class_dir):
        if folder is not None and os.path.exists(folder):
            raise ValueError(f"{folder} exists already; tiny-subject writes new folders only")
    for folder in (args.instance_dir, args.class_dir):
        if folder is not None:
            os.makedirs(os.path.dirname(os.path.abspath(folder)), exist_ok=True)
    torch.set_num_threads(args.threads)
    combos = subject.ALL_INSTANCE_COMBOS if args.all_pairs else subject.INSTANCE_COMBOS
    atomic_write_folder(args.instance_dir, lambda tmp: subject.write_instance_folder(tmp, combos, seed=args.seed,
                                                                                     subject=args.subject))
    print(f"wrote {len(combos)} instance images of the {args.subject} to {args.instance_dir}")
    if args.class_dir is not None:
        pipe = Pipeline(load_model(tiny_model_path(), verbose=False), log=lambda *_: None)
        written = []
        atomic_write_folder(args.class_dir,
                            lambda tmp: written.append(subject.write_class_folder(pipe, tmp, every=args.class_every)))
        print(f"wrote {written[0]} class images to {args.class_dir}")


def add_train_tiny_features(p):
    p.add_argument("--out", required=True, help="run folder: checkpoint, report.json, the weights")
    d = tiny_features.Recipe()
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--eval-samples", type=int, default=d.eval_samples)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (the last bits of the weights depend on it; the shipped file used 1)")


def run_train_tiny_features(args):
    torch.set_num_threads(args.threads)
    tiny_features.train_features(args.out, tiny_features.Recipe(seed=args.seed, steps=args.steps,
                                                                eval_samples=args.eval_samples))


def add_train_tiny_captioner(p):
    p.add_argument("--out", required=True, help="run folder: checkpoint, report.json, the model folder tiny_captioner/")
    d = tiny_captioner.Recipe()
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--bank-size", type=int, default=d.bank_size, help="training pictures, drawn once")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples, help="held-out pictures measured at the end")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (the last bits of the weights depend on it; the shipped folder used 1)")


def run_train_tiny_captioner(args):
    torch.set_num_threads(args.threads)
    recipe = replace(tiny_captioner.Recipe(), seed=args.seed, steps=args.steps, batch=args.batch, lr=args.lr,
                     bank_size=args.bank_size, eval_samples=args.eval_samples)
    tiny_captioner.train_captioner(args.out, recipe)


def add_train_tiny_controlnet(p):
    p.add_argument("--out", required=True, help="run folder: data/, run/, minisd-tiny-canny.safetensors, report.json")
    d = tiny_controlnet.Recipe()
    for name in ("seed", "images", "steps", "batch", "eval_maps"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--lr-scheduler", default=d.lr_scheduler, choices=SCHEDULERS,
                   help="(default: %(default)s; see minisd train --help)")
    p.add_argument("--eval-cfg", type=float, default=d.eval_cfg, help="the score's guidance scale (default: "
                                                                       "%(default)s; TINY_CANNY_CARD.md)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is fastest for the tiny model on a busy machine)")


def run_train_tiny_controlnet(args):
    torch.set_num_threads(args.threads)
    recipe = tiny_controlnet.Recipe(seed=args.seed, images=args.images, steps=args.steps, batch=args.batch,
                                    lr=args.lr, lr_scheduler=args.lr_scheduler, eval_maps=args.eval_maps,
                                    eval_cfg=args.eval_cfg)
    try:
        tiny_controlnet.train_tiny_controlnet(args.out, recipe)
    except loop.Stopped as e:       # as train-tiny: the recipe always resumes from OUT/run
        return _stopped(e, "run the same command to continue")


def add_sweep(p):
    p.add_argument("spec", help="the sweep's TOML file (see minisd/sweep.py)")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna RDB storage shared by several workers (default: SQLite in the sweep folder)")
    p.add_argument("--trials", type=int, default=None, help="finished trials wanted (default: the spec's)")


def run_sweep(args):
    def on_sigterm(signum, frame):                   # a scheduler's stop: end like Ctrl-C (the command is stopped)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        sweep.sweep(sweep.read_spec(args.spec), args.storage, args.trials)
    except KeyboardInterrupt:
        print("minisd sweep: interrupted; run the same command again to continue the study", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
