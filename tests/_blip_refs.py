"""Reference BLIP folders for the captioning tests: transformers' BlipForConditionalGeneration with random weights
at a given configuration, saved with save_pretrained beside a WordPiece vocab.txt made here, the tokenizer files
transformers writes for it, and BlipImageProcessorPil's preprocessor_config.json. No real weights or vocabulary
exist offline.

The vocabulary has BERT's specials at BERT's ids ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103), single
characters and their "##" continuations, a few hundred words and their pieces, and filler words up to 30,522
entries; [DEC] (30522, BLIP's bos) and [ENC] (30523) are added as special tokens, as BLIP's tokenizer has them.

A random decoder at transformers' init repeats one token (its residual stream is dominated by the layers'
constant part), and a random ViT at BlipVisionConfig's default init (std 1e-10; the real configs say 0.02) sees
no difference between pictures. `vary` scales the token embeddings x3 and the attention/MLP output projections
x0.2 so that captions differ per picture and between greedy and beam search (REFERENCE.md, BLIP note).
"""
import string

import numpy as np
import torch
from PIL import Image, ImageDraw

WORDS = ("a photo of the an and in on with cat dog man woman sitting standing red blue green yellow white black "
         "small large picture table street car tree house field sky water two three people riding playing "
         "holding looking near front top next to is are at by its their there this that some many dogs cats "
         "café naïve résumé don't it's we're they've i'm can't won't don t s re ve m n").split()


def write_vocab(path, size=30522):
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = string.ascii_lowercase + string.digits + string.punctuation + "éèàüöçñ中文字日本"
    vocab += list(chars) + ["##" + c for c in chars]
    for w in WORDS:
        vocab += [w, "##" + w]
    vocab += ["##ing", "##s", "##ed", "play", "look", "hold", "stand", "sit", "##ting", "##er"]
    vocab = list(dict.fromkeys(vocab))
    vocab += [f"w{i}" for i in range(size - len(vocab))]
    assert len(vocab) == size
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")


def save_tokenizer(folder):
    """vocab.txt plus what transformers' BertTokenizer with [DEC]/[ENC] added writes (tokenizer.json, config)."""
    from transformers import BertTokenizer
    write_vocab(folder / "vocab.txt")
    tok = BertTokenizer.from_pretrained(str(folder))
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    assert tok.convert_tokens_to_ids("[DEC]") == 30522
    tok.save_pretrained(str(folder))
    return tok


def reference_blip(vision=None, text=None, seed=0, sep_bias=0.0):
    """transformers' BlipForConditionalGeneration with `vision`/`text` config overrides on base, every tensor
    random: weights and biases N(0, 0.02), LayerNorm scales 1 + N(0, 0.1) and shifts N(0, 0.1) (transformers'
    init zeroes biases and shifts, where a mix-up of two of them would go unseen). Built on the meta device and
    filled here: 4x faster than transformers' own init at full size."""
    from transformers import BlipConfig, BlipForConditionalGeneration
    cfg = BlipConfig(vision_config={"initializer_range": 0.02, **(vision or {})},
                     text_config={"num_attention_heads": 12, **(text or {})})
    with torch.device("meta"):
        ref = BlipForConditionalGeneration(cfg)
    ref = ref.to_empty(device="cpu").eval()
    ref.tie_weights()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in ref.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, torch.nn.LayerNorm):
                    p.normal_(1.0 if name == "weight" else 0.0, 0.1, generator=g)
                else:
                    p.normal_(0.0, 0.02, generator=g)
        embeddings = ref.text_decoder.bert.embeddings
        embeddings.position_ids.copy_(torch.arange(embeddings.position_ids.shape[-1])[None])
        vary(ref)
        ref.text_decoder.cls.predictions.bias[cfg.text_config.sep_token_id] += sep_bias
    return ref


@torch.no_grad()
def vary(ref):
    ref.text_decoder.bert.embeddings.word_embeddings.weight.mul_(3)
    for layer in ref.text_decoder.bert.encoder.layer:
        for m in (layer.attention.output.dense, layer.crossattention.output.dense, layer.output.dense):
            m.weight.mul_(0.2)


def save_folder(ref, folder):
    """The transformers-layout folder a user has: weights, config, tokenizer, preprocessor config."""
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    folder.mkdir(parents=True, exist_ok=True)
    ref.save_pretrained(str(folder))
    size = ref.config.vision_config.image_size
    BlipImageProcessorPil(size={"height": size, "width": size}).save_pretrained(str(folder))
    save_tokenizer(folder)
    return folder


def pictures(n=4, seed=0):
    """n distinct RGB pictures of different sizes and aspect ratios: a coloured background and a shape."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = [(500, 375), (320, 480), (384, 384), (640, 200), (97, 131)][i % 5]
        image = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        box = (x0, y0, x0 + w // 3, y0 + h // 3)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if i % 2 else draw.rectangle)(box, fill=colour)
        noise = rng.integers(-20, 21, (h, w, 3))
        out.append(Image.fromarray(np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255).astype(np.uint8)))
    return out
