"""BLIP's image captioner (Li et al. 2022, "BLIP: Bootstrapping Language-Image Pre-training"): a ViT reads the
picture, a BERT-style text decoder writes the caption while cross-attending to every image token.

    pixels (N, 3, 384, 384) -> ViT (vit.py) -> image tokens (N, 577, vision width)
    tokens [DEC] w1 .. wt -> embeddings + learned positions -> LayerNorm
      -> `layers` x post-LN BERT layers (Devlin et al. 2019), each:
           x = LN(x + self-attention(x), causal)
           x = LN(x + cross-attention(x, image tokens))
           x = LN(x + MLP(x))
      -> head: LN(gelu(dense x)) @ token_embedding^T + bias      (the output matrix is the input one, tied)
      -> next-token logits (N, 30524)

The decoder is "Image-grounded text decoder" of the paper's fig. 2, trained with language modelling; captioning
starts from [DEC] (the bos token, BERT's [CLS] replaced), optionally followed by a prompt ("a picture of", the
paper's sec. 4.1), and ends at [SEP]. Decoding is decode.py's; `make_step` feeds it with a key/value cache:
the image's keys and values are computed once per layer and picture, each new token attends to the cached
ones before it.

The configuration comes from a transformers folder's config.json (`Salesforce/blip-image-captioning-base`:
ViT-B/16, `-large`: ViT-L/16, both at 384 px with the same BERT-base decoder); weights_convert/blip.py maps the
names.
"""
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import attention
from .decode import generate
from .vit import ViT, ViTConfig


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 30524          # BERT's 30522 + [DEC] + [ENC]
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    max_positions: int = 512
    layer_norm_eps: float = 1e-12
    encoder_width: int = 768         # the ViT's width, what cross-attention reads
    bos_token_id: int = 30522        # [DEC]
    sep_token_id: int = 102          # [SEP]: the end of a caption
    pad_token_id: int = 0            # [PAD]


@dataclass(frozen=True)
class BlipConfig:
    vision: ViTConfig = field(default_factory=ViTConfig)
    text: TextConfig = field(default_factory=TextConfig)


BLIP_BASE = BlipConfig()             # Salesforce/blip-image-captioning-base: ViT-B/16
BLIP_LARGE = BlipConfig(ViTConfig(width=1024, layers=24, heads=16, mlp_width=4096),   # ViT-L/16
                        TextConfig(encoder_width=1024))


def config_from_json(d: dict) -> BlipConfig:
    """A BlipConfig from a transformers BlipForConditionalGeneration config.json dict."""
    if d.get("model_type") != "blip":
        raise ValueError(f"config.json: model_type {d.get('model_type')!r}, expected 'blip'")
    v, t = d.get("vision_config") or {}, d.get("text_config") or {}
    for name, sub in (("vision_config", v), ("text_config", t)):
        if sub.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"config.json: {name}.hidden_act {sub['hidden_act']!r}; BLIP uses 'gelu'")
    vd, td = ViTConfig(), TextConfig()
    vision = ViTConfig(width=v.get("hidden_size", vd.width), layers=v.get("num_hidden_layers", vd.layers),
                       heads=v.get("num_attention_heads", vd.heads),
                       mlp_width=v.get("intermediate_size", vd.mlp_width),
                       image_size=v.get("image_size", vd.image_size), patch_size=v.get("patch_size", vd.patch_size),
                       layer_norm_eps=v.get("layer_norm_eps", vd.layer_norm_eps))
    text = TextConfig(vocab_size=t.get("vocab_size", td.vocab_size), width=t.get("hidden_size", td.width),
                      layers=t.get("num_hidden_layers", td.layers), heads=t.get("num_attention_heads", 8),
                      mlp_width=t.get("intermediate_size", td.mlp_width),
                      max_positions=t.get("max_position_embeddings", td.max_positions),
                      layer_norm_eps=t.get("layer_norm_eps", td.layer_norm_eps), encoder_width=vision.width,
                      bos_token_id=t.get("bos_token_id", td.bos_token_id),
                      sep_token_id=t.get("sep_token_id", td.sep_token_id),
                      pad_token_id=t.get("pad_token_id", td.pad_token_id))
    return BlipConfig(vision, text)


class Attention(nn.Module):
    """BERT's attention with separate q, k, v projections; k and v read `kv_width`-wide tokens (the image's for
    cross-attention)."""

    def __init__(self, width, heads, kv_width):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(kv_width, width)
        self.v = nn.Linear(kv_width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x, k, v, causal=False):
        """x: (N, T, width); k, v: (B, S, width), already projected, with N a multiple of B: rows
        j*N/B .. (j+1)*N/B - 1 of x all read k[j], v[j] (the beams of picture j; decode.py keeps them together).
        They are attended to as N/B*T queries of one sequence: the same numbers, without N/B copies of k, v."""
        q = self.q(x).reshape(k.shape[0], -1, x.shape[-1])
        return self.out(attention(q, k, v, self.heads, causal=causal).reshape(x.shape))


class DecoderLayer(nn.Module):
    """Post-LN (BERT): each sub-layer's output is added to its input, then normalised."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg.width, cfg.heads, cfg.width)
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.cross_attn = Attention(cfg.width, cfg.heads, cfg.encoder_width)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)
        self.ln_3 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x, self_kv, cross_kv):
        """x: the new tokens (N, T, width); self_kv: keys and values of the earlier tokens (N, P, width) each,
        cross_kv: the image's. Returns x and the self-attention keys/values including the new tokens."""
        k = torch.cat([self_kv[0], self.self_attn.k(x)], dim=1)
        v = torch.cat([self_kv[1], self.self_attn.v(x)], dim=1)
        # causal among the new tokens; a single new token sees all cached ones, which is the same thing
        x = self.ln_1(x + self.self_attn(x, k, v, causal=x.shape[1] > 1 and self_kv[0].shape[1] == 0))
        x = self.ln_2(x + self.cross_attn(x, *cross_kv))
        x = self.ln_3(x + self.fc2(F.gelu(self.fc1(x))))
        return x, (k, v)


class TextDecoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.max_positions, cfg.width))
        self.ln_embed = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.head_dense = nn.Linear(cfg.width, cfg.width)    # BERT's prediction-head transform
        self.head_ln = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.head_bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def cross_kv(self, image):
        """The image's keys and values for every layer: [k_0, v_0, k_1, v_1, ...], each (N, S, width)."""
        return [t for layer in self.layers for t in (layer.cross_attn.k(image), layer.cross_attn.v(image))]

    def forward(self, ids, cross, past):
        """ids (N, T) after `past` tokens; cross: cross_kv(image); past: [k_0, v_0, ...] of the earlier tokens
        ((N, 0, width) tensors at the start). Returns logits (N, T, vocab) and the new past."""
        start = past[0].shape[1]
        if start + ids.shape[1] > self.cfg.max_positions:
            raise ValueError(f"a caption longer than {self.cfg.max_positions} tokens")
        x = self.token_embedding(ids) + self.positional_embedding[start:start + ids.shape[1]]
        x = self.ln_embed(x)
        new_past = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, past[2 * i:2 * i + 2], cross[2 * i:2 * i + 2])
            new_past += kv
        h = self.head_ln(F.gelu(self.head_dense(x)))
        return h @ self.token_embedding.weight.T + self.head_bias, new_past


class Blip(nn.Module):
    def __init__(self, cfg: BlipConfig = BLIP_BASE):
        super().__init__()
        if cfg.text.encoder_width != cfg.vision.width:
            raise ValueError(f"the decoder reads {cfg.text.encoder_width}-wide image tokens, the ViT makes "
                             f"{cfg.vision.width}")
        self.cfg = cfg
        self.vision = ViT(cfg.vision)
        self.text = TextDecoder(cfg.text)

    def make_step(self):
        """decode.py's step for one decoding. Its first call gets [image tokens (B, S, width)] and computes the
        image's keys and values for every layer once, kept here: decode.py keeps the beams of a picture in
        consecutive rows, so they need not be copied per beam nor reordered. The cache it returns holds the
        self-attention keys and values of the tokens fed so far, [k_0, v_0, k_1, v_1, ...]."""
        cross = []

        def step(ids, cache):
            if not cross:
                cross.extend(self.text.cross_kv(cache[0]))
                cache = [cache[0].new_zeros(ids.shape[0], 0, self.cfg.text.width)] * (2 * len(self.text.layers))
            logits, past = self.text(ids, cross, cache)
            return logits[:, -1], past

        return step


class BlipCaptioner:
    """A loaded BLIP with its tokenizer and image processor: `.caption(images) -> captions`."""

    def __init__(self, model: Blip, tokenizer, processor):
        self.model, self.tokenizer, self.processor = model, tokenizer, processor

    @torch.no_grad()
    def encode(self, images):
        """PIL images -> the ViT's image tokens (N, tokens, width)."""
        weight = self.model.vision.patch_embed.weight
        return self.model.vision(self.processor(images).to(weight.device, weight.dtype))

    @torch.no_grad()
    def generate_ids(self, images, prompt=None, num_beams=1, min_length=5, max_length=75, features=None):
        """PIL images (or their `features` from `encode`) -> token ids (N, L), as transformers'
        BlipForConditionalGeneration.generate returns them: [DEC], the prompt's tokens, the caption's, then
        [SEP] and padding."""
        t = self.model.cfg.text
        if max_length > t.max_positions:
            raise ValueError(f"max_length {max_length} is more than this decoder's {t.max_positions} positions")
        image = self.encode(images) if features is None else features
        # transformers tokenizes [CLS] prompt [SEP], puts [DEC] in place of [CLS] and drops the [SEP]
        prompt_ids = self.tokenizer.encode(prompt) if prompt else []
        ids = torch.tensor([[t.bos_token_id, *prompt_ids]] * len(image), device=image.device)
        return generate(self.model.make_step(), ids, cache=[image], num_beams=num_beams, max_length=max_length,
                        min_length=min_length, eos_token_id=t.sep_token_id, pad_token_id=t.pad_token_id)

    def caption(self, images, prompt=None, num_beams=1, min_length=5, max_length=75):
        """PIL images -> one caption each, decoded as BlipProcessor.decode(skip_special_tokens=True) does: the
        prompt, if any, starts the caption."""
        ids = self.generate_ids(images, prompt, num_beams, min_length, max_length)
        return [self.tokenizer.decode(row) for row in ids.tolist()]


def load_blip(folder, device="cpu", dtype=torch.float32):
    """A BlipCaptioner from a transformers BlipForConditionalGeneration folder."""
    from weights_convert.blip import from_transformers
    from weights_convert.folders import read_config, read_weights

    from .bert_tokenizer import BertTokenizer
    from .preprocess import ImageProcessor

    folder = Path(folder)
    cfg = config_from_json(read_config(folder))
    with torch.device("meta"):
        model = Blip(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(from_transformers(read_weights(folder), cfg, shapes), assign=True)
    model = model.to(device=device, dtype=dtype).eval()
    processor = ImageProcessor.from_json(read_config(folder, "preprocessor_config.json"))
    return BlipCaptioner(model, BertTokenizer.from_folder(folder), processor)
