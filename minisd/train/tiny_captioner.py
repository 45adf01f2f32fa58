"""The tiny captioner's recipe: BLIP (minisd/caption/blip.py: a ViT reads the picture, a BERT-style decoder writes
the caption, cross-attending to it) at a tiny config, trained from scratch on the shapes world, so that
`minisd caption --model tiny` works offline on the tiny world's pictures.

    minisd train-tiny-captioner --out runs/tiny-captioner    # reproduces minisd/assets/tiny_captioner/

It is BLIP in miniature, not another network: the same ViT (pre-LN, class token, learned positions), the same
post-LN decoder with causal self-attention and cross-attention to every image token, the same [DEC]-started,
[SEP]-ended captions, the same image processing (squash to a square, bicubic, CLIP mean/std). Its training is
BLIP's captioning objective alone (the language-modelling loss of Li et al. 2022, sec. 3.2; BLIP also trains
contrastive and matching heads, which captioning does not use), through minisd.train.train.

The pictures come in every aspect ratio, as photos do: the processor squashes each to 32x32, so the model learns
what a circle, a square and a triangle look like stretched. Held out from training, to measure that it reads
pictures rather than recalls them: the 12 colour/shape/background combinations of shapes.HELD_OUT and the shape
sizes between TRAIN_SCALES' two bands. Everything random is a pure function of (seed, index), so two runs with
the same seed and thread count give the same bits.

Colours are learnt in a hundred steps, shapes only after a long plateau (about a thousand steps here; the loss
sits near 0.14 while the shape word is a guess). Why: every colour pair appears both ways round (red on blue and
blue on red), so a linear feature of a patch, which is all a patch embedding is, responds to an edge with a sign
set by the colours and averages to nothing over the data; only non-linear (|response|-like) features of later
layers carry the shape, and gradient descent finds them slowly. 4x4 patches on 32x32 pictures (the same 64 tokens
as 8x8 patches on 64x64, and simpler edge patches) came off the plateau sooner in the trials behind this recipe.

The shipped folder is transformers' BlipForConditionalGeneration layout (config.json, model.safetensors,
vocab.txt, tokenizer_config.json, preprocessor_config.json): transformers' BlipForConditionalGeneration and
BlipProcessor load it as they load Salesforce/blip-image-captioning-base.
"""
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..caption.blip import Blip, BlipConfig, TextConfig, load_blip
from ..caption.preprocess import ImageProcessor
from ..caption.vit import ViTConfig
from ..tiny import shapes
from .loop import TrainConfig, atomic_write_folder, train

# The vocabulary: BERT's special tokens, BLIP's [DEC] (the token a caption starts from), and the world's words.
# Its own, so the file stays small: BLIP's tokenizer finds every token by its text, and config.json names the ids.
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
WORDS = ("a", "on", "background", *shapes.COLOURS, *shapes.SHAPES)
VOCAB = SPECIALS + WORDS
IDS = {token: i for i, token in enumerate(VOCAB)}

SIZE = 32                       # the processor squashes every picture to SIZE x SIZE
CONFIG = BlipConfig(
    ViTConfig(width=64, layers=2, heads=4, mlp_width=256, image_size=SIZE, patch_size=4),
    TextConfig(vocab_size=len(VOCAB), width=64, layers=2, heads=4, mlp_width=256, max_positions=128,
               encoder_width=64, bos_token_id=IDS["[DEC]"], sep_token_id=IDS["[SEP]"], pad_token_id=IDS["[PAD]"]))
PROCESSOR = ImageProcessor(height=SIZE, width=SIZE)

# Shape sizes, as a fraction of the picture's shorter side: training draws from two bands, the gap between them is
# never seen and is where held-out pictures are drawn.
TRAIN_SCALES = ((0.25, 0.40), (0.55, 0.85))
HELD_OUT_SCALES = (0.40, 0.55)
TRAIN_ASPECTS = (1 / 2, 2)      # width / height, log-uniform
TRAIN_SHORT_SIDES = (40, 128)   # pixels of the shorter side, uniform
ASPECTS = ((1, 1), (3, 2), (2, 3))   # the held-out pictures: square, landscape, portrait


@dataclass(frozen=True)
class Recipe:
    """Every number of the training run; the shipped folder is Recipe() (seed 0) at --threads 1."""
    seed: int = 0
    steps: int = 5000
    batch: int = 64
    lr: float = 3e-3
    # BLIP's captioning loss smooths labels by 0.1 (Li et al. 2022, sec. 3.2); the tiny world's captions have one
    # right answer; without smoothing (and with 3500 steps, not 2500) held-out accuracy rose from 58-63% to 88-92%
    label_smoothing: float = 0.0
    warmup_steps: int = 100
    # training pictures drawn and processed once, then sampled with replacement. 8192 were seen 27 times each and
    # partly memorised, colour pair by colour pair: a held-out pair's missing shape was guessed from the pair
    # (green circles on purple: 72% wrong). 65536 pictures (about 5 sightings each) and 5000 steps, not 3500,
    # took held-out pictures from 88-89% to 99-100% (TINY_CAPTIONER_CARD.md)
    bank_size: int = 65536
    eval_samples: int = 300         # held-out pictures measured at the end (stream seed + 1)


# ---- data: pure functions of (seed, index) --------------------------------------------------------------------

def picture_size(short, aspect):
    """(width, height) of a picture with shorter side `short` and width / height `aspect`."""
    return (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))


def training_picture(seed, index):
    """(PIL image, (colour, shape, background)): a training combination, in any aspect ratio in TRAIN_ASPECTS and
    any shorter side in TRAIN_SHORT_SIDES, the shape's size in one of TRAIN_SCALES' bands."""
    rng = np.random.default_rng([seed, index])
    combos = shapes.all_combinations(held_out=False)
    truth = combos[rng.integers(len(combos))]
    aspect = math.exp(rng.uniform(*np.log(TRAIN_ASPECTS)))
    size = picture_size(int(rng.integers(TRAIN_SHORT_SIDES[0], TRAIN_SHORT_SIDES[1] + 1)), aspect)
    scale, center = shapes.placement(rng, *TRAIN_SCALES[rng.integers(len(TRAIN_SCALES))], size=size)
    return shapes.draw(*truth, size, scale, center), truth


def held_out_picture(seed, index):
    """(PIL image, truth): a combination of shapes.HELD_OUT, the shape's size in HELD_OUT_SCALES (between the
    trained bands), the aspect ratio ASPECTS[index % 3] with a shorter side of 48, 50, ... to 128 pixels."""
    rng = np.random.default_rng([seed, index])
    truth = shapes.HELD_OUT[rng.integers(len(shapes.HELD_OUT))]
    w, h = ASPECTS[index % len(ASPECTS)]
    size = picture_size(2 * int(rng.integers(24, 65)), w / h)       # an even shorter side: exactly 3:2 / 2:3
    scale, center = shapes.placement(rng, *HELD_OUT_SCALES, size=size)
    return shapes.draw(*truth, size, scale, center), truth


def token_ids(caption):
    """[DEC] caption [SEP] as ids (every caption of the world is 7 words: 9 ids)."""
    return [IDS["[DEC]"], *(IDS[w] for w in caption.split()), IDS["[SEP]"]]


def bank(seed, n, chunk=512):
    """The first n training pictures of stream `seed`, processed: (pixels (n, 3, SIZE, SIZE), ids (n, 9))."""
    pixels, ids = [], []
    for start in range(0, n, chunk):
        pictures = [training_picture(seed, i) for i in range(start, min(n, start + chunk))]
        pixels.append(PROCESSOR([image for image, _ in pictures]))
        ids += [token_ids(shapes.caption(*truth)) for _, truth in pictures]
    return torch.cat(pixels), torch.tensor(ids)


# ---- the objective --------------------------------------------------------------------------------------------

def caption_loss(model: Blip, pixels, ids, label_smoothing=0.0):
    """BLIP's captioning loss: cross-entropy of each next token given the picture and the tokens before it
    (teacher forcing; the decoder's self-attention is causal), with label smoothing as BLIP trains it."""
    image = model.vision(pixels)                                              # (N, tokens, width)
    empty = image.new_zeros(ids.shape[0], 0, model.cfg.text.width)
    logits, _ = model.text(ids[:, :-1], model.text.cross_kv(image), [empty] * (2 * len(model.text.layers)))
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), ignore_index=model.cfg.text.pad_token_id,
                           label_smoothing=label_smoothing)


# ---- measuring ------------------------------------------------------------------------------------------------

def accuracy(captioner, pictures, batch=100):
    """Fraction of (image, truth) pictures whose greedy caption is exactly shapes.caption(*truth), and the
    captions. A caption is right when shapes.parse_caption reads the truth from it and it has the world's form."""
    captions = []
    for start in range(0, len(pictures), batch):
        captions += captioner.caption([image for image, _ in pictures[start:start + batch]])
    right = [text == shapes.caption(*truth) and shapes.parse_caption(text) == truth
             for text, (_, truth) in zip(captions, pictures)]
    return sum(right) / len(pictures), captions


# ---- the transformers folder ----------------------------------------------------------------------------------

def transformers_config(cfg: BlipConfig):
    """config.json of transformers' BlipForConditionalGeneration for `cfg`."""
    v, t = cfg.vision, cfg.text
    return {
        "architectures": ["BlipForConditionalGeneration"], "model_type": "blip",
        "vision_config": {"model_type": "blip_vision_model", "hidden_size": v.width, "num_hidden_layers": v.layers,
                          "num_attention_heads": v.heads, "intermediate_size": v.mlp_width,
                          "image_size": v.image_size, "patch_size": v.patch_size, "hidden_act": "gelu",
                          "layer_norm_eps": v.layer_norm_eps},
        "text_config": {"model_type": "blip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.width,
                        "encoder_hidden_size": t.encoder_width, "num_hidden_layers": t.layers,
                        "num_attention_heads": t.heads, "intermediate_size": t.mlp_width,
                        "max_position_embeddings": t.max_positions, "hidden_act": "gelu",
                        "layer_norm_eps": t.layer_norm_eps, "bos_token_id": t.bos_token_id,
                        "sep_token_id": t.sep_token_id, "eos_token_id": t.sep_token_id,
                        "pad_token_id": t.pad_token_id, "is_decoder": True, "tie_word_embeddings": True},
        "tie_word_embeddings": True,
    }


FOLDER_FILES = {
    "tokenizer_config.json": {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512,
                              "bos_token": "[DEC]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                              "pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]"},
    "preprocessor_config.json": {"image_processor_type": "BlipImageProcessor", "processor_class": "BlipProcessor",
                                 "do_convert_rgb": True, "do_resize": True, "size": {"height": SIZE, "width": SIZE},
                                 "resample": PROCESSOR.resample, "do_rescale": True,
                                 "rescale_factor": PROCESSOR.rescale_factor, "do_normalize": True,
                                 "image_mean": list(PROCESSOR.mean), "image_std": list(PROCESSOR.std)},
}


def write_folder(model: Blip, folder):
    """The model as a transformers BlipForConditionalGeneration folder, fp32, written into a fresh temporary
    folder beside `folder` and renamed into place (loop.atomic_write_folder: a reader sees the old folder or the
    new one, never half)."""
    from weights_convert.blip import to_transformers

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().float().contiguous() for k, v in to_transformers(model.state_dict(), model.cfg).items()}

    def write(tmp):
        tmp = Path(tmp)
        save_file(weights, tmp / "model.safetensors", {"format": "pt"})   # transformers refuses files without it
        (tmp / "model.safetensors").chmod(0o644)
        (tmp / "config.json").write_text(json.dumps(transformers_config(model.cfg), indent=1) + "\n")
        (tmp / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
        for name, content in FOLDER_FILES.items():
            (tmp / name).write_text(json.dumps(content, indent=1) + "\n")
    atomic_write_folder(str(folder), write)
    return folder


# ---- training -------------------------------------------------------------------------------------------------

FOLDER = "tiny_captioner"


def check_recipe(recipe: Recipe):
    for name in ("steps", "batch", "bank_size"):
        if getattr(recipe, name) < 1:
            raise ValueError(f"the tiny captioner's {name.replace('_', ' ')} must be >= 1, got {getattr(recipe, name)}")
    if recipe.eval_samples < 0:
        raise ValueError(f"the tiny captioner's eval samples must be >= 0, got {recipe.eval_samples}")


def train_captioner(out_dir, recipe=Recipe(), log=print):
    """Train into out_dir (resuming its checkpoint), write the folder out_dir/tiny_captioner/ and
    out_dir/report.json. Returns (folder, report)."""
    check_recipe(recipe)
    os.makedirs(out_dir, exist_ok=True)
    t0, c0 = time.time(), time.process_time()
    pixels, ids = bank(recipe.seed, recipe.bank_size)
    torch.manual_seed(recipe.seed)                                  # the initial weights
    model = Blip(CONFIG)
    init_weights(model)
    cfg = TrainConfig(steps=recipe.steps, lr=recipe.lr, lr_schedule="cosine", warmup_steps=recipe.warmup_steps,
                      ema_decay=0.0, checkpoint_every=250, seed=recipe.seed)

    def loss_fn(step, generator):                                   # a batch drawn from the bank
        i = torch.randint(0, len(pixels), (recipe.batch,), generator=generator)
        return caption_loss(model, pixels[i], ids[i], recipe.label_smoothing)

    losses = []
    weights = train(model, dict(model.named_parameters()), loss_fn, cfg, out_dir, "tiny_captioner",
                    on_step=_progress(log, losses, every=max(1, recipe.steps // 20)), log=log)
    model.load_state_dict(weights)
    model.eval().requires_grad_(False)
    seconds, cpu = time.time() - t0, time.process_time() - c0
    report = {"recipe": asdict(recipe), "config": asdict(CONFIG), "threads": torch.get_num_threads(),
              "train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu, 1),
              "parameters": sum(p.numel() for p in model.parameters()), "loss_curve": losses}
    folder = write_folder(model, os.path.join(out_dir, FOLDER))
    pictures = [held_out_picture(recipe.seed + 1, i) for i in range(recipe.eval_samples)]
    acc = accuracy(load_blip(folder), pictures)[0] if pictures else None
    report["held_out_accuracy"] = acc
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    size = sum(f.stat().st_size for f in folder.iterdir())
    log(f"wrote {folder} ({size / 1e6:.2f} MB); held-out accuracy {acc} on {recipe.eval_samples} pictures")
    return folder, report


def init_weights(model):
    """BERT's and BLIP's initialisation: Linear, Conv2d and Embedding weights and the learned embeddings
    N(0, 0.02) (timm's trunc_normal_ std 0.02 for the ViT's, untruncated here), biases 0, LayerNorms 1 and 0."""
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.zeros_(p)
        elif p.ndim == 1:                                            # LayerNorm weights (and the class token)
            torch.nn.init.ones_(p) if "ln" in name else torch.nn.init.normal_(p, std=0.02)
        else:
            torch.nn.init.normal_(p, std=0.02)


def _progress(log, losses, every):
    """Logs the mean loss of every `every` steps and appends it to `losses` (the report's loss curve)."""
    window = []

    def on_step(step, loss, lr):
        window.append(loss)
        if (step + 1) % every == 0:
            losses.append(round(sum(window) / len(window), 4))
            log(f"step {step + 1}: loss {losses[-1]:.4f} lr {lr:.2e}")
            window.clear()
    return on_step
