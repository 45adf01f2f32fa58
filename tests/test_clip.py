"""minisd's text encoder computes what SD1's and SD2's reference encoders compute, and the key maps are exact.

References, all with random weights at the real configs (offline):
- SD1: transformers CLIPTextModel at CLIP ViT-L/14's text config (what diffusers and LDM's FrozenCLIPEmbedder run);
- SD2: OpenCLIP ViT-H/14's text tower (24 blocks) read with LDM's "penultimate" rule, and diffusers' SD2 text
  encoder, a transformers CLIPTextModel with 23 layers and exact gelu.

Every parameter is re-drawn at a sane scale (weights N(0, 0.02), LayerNorm gains 1 + N(0, 0.1), biases N(0, 0.02))
so no output layer is zero. Tolerance: fp32 on CPU, max abs error <= 1e-4 x output std -- the implementations
differ only in summation order (fused vs separate q/k/v matmuls, SDPA vs explicit softmax), which costs ~1e-6
relative per layer. Each comparison also shows one changed token moves the output far beyond the tolerance.
"""
import gc
import json
import os

import pytest
import torch

from minisd.clip import TextEncoder
from minisd.config import SD1_TEXT, SD2_TEXT
from minisd.tokenizer import Tokenizer
from weights_convert.text import from_open_clip, from_transformers, to_open_clip, to_transformers

TOL = 1e-4   # x output std, see the module docstring

DATA = os.path.join(os.path.dirname(__file__), "data", "prompts.txt")
with open(DATA, encoding="utf-8") as f:
    CORPUS = [json.loads(line) for line in f if line.strip()]
PROMPTS = [CORPUS[60], next(p for p in CORPUS if len(p.split()) > 100)]   # an A1111 prompt; one > 77 tokens


def redraw_(module, seed):
    """Re-draw every parameter: reference inits zero some layers, which would let a comparison pass trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module


def build_on_meta(make, seed):
    """Build a reference on the meta device (skipping its random init, ~10 s for OpenCLIP-H's tower on these
    CPUs), then re-draw every parameter (seed=None: the caller loads all of them) and recompute its one
    non-persistent buffer with its own code."""
    with torch.device("meta"):
        module = make()
    module = module.to_empty(device="cpu")
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name.endswith("position_ids"):             # transformers: arange(77)[None]
                buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
            elif name == "attn_mask":                     # open_clip: its causal mask, -inf above the diagonal
                buf.copy_(module.build_causal_mask())
            else:
                raise AssertionError(f"unexpected buffer {name}: recompute it here")
    return (redraw_(module, seed) if seed is not None else module).eval()


def hf_text_model(cfg, seed):
    from transformers import CLIPTextConfig, CLIPTextModel
    config = CLIPTextConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=4 * cfg.width,
                            num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                            max_position_embeddings=cfg.context_length, hidden_act=cfg.activation,
                            layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=cfg.pad_id)
    return build_on_meta(lambda: CLIPTextModel(config), seed)


def load_ours(cfg, state_dict):
    with torch.device("meta"):
        model = TextEncoder(cfg)
    model.load_state_dict(state_dict, assign=True)   # takes the tensors as they are: no init, no copy
    return model.eval()


def assert_close(ours, ref, what):
    err, std = (ours - ref).abs().max().item(), ref.std().item()
    print(f"{what}: max abs err {err:.3e}, output std {std:.4f}, ratio {err / std:.2e}")
    assert err <= TOL * std, f"{what}: max abs error {err:.3e} > {TOL} x std {std:.4f}"
    return std


def assert_one_token_moves_output(model, tokens, out, position=3):
    """The comparisons can fail: changing one token changes the output from that position on (far beyond
    the tolerance) and, with the causal mask, leaves earlier positions as they were."""
    changed = tokens[:1].clone()
    changed[0, position] = (changed[0, position] + 1000) % 49406
    moved = model(changed)[0]
    assert (moved[position:] - out[0, position:]).abs().max() > 100 * TOL * out.std()
    assert torch.allclose(moved[:position], out[0, :position], atol=TOL * out.std())


# ---------------------------------------------------------------- SD1: CLIP ViT-L/14 text (transformers) -----

@pytest.fixture(scope="module")
def sd1():
    hf = hf_text_model(SD1_TEXT, seed=1)
    ours, unused = from_transformers(hf.state_dict(), SD1_TEXT)
    model = load_ours(SD1_TEXT, ours)
    tokens = Tokenizer(pad_id=SD1_TEXT.pad_id)(PROMPTS)
    with torch.no_grad():
        ref = hf(input_ids=tokens, output_hidden_states=True)
    yield hf, model, tokens, unused, ref
    del hf, model, ref
    gc.collect()


@torch.no_grad()
def test_sd1_matches_transformers_clip_text_model(sd1):
    hf, model, tokens, _, ref = sd1
    out = model(tokens)
    assert out.shape == (2, 77, 768)
    assert_close(out, ref.last_hidden_state, "SD1 vs transformers")
    assert_one_token_moves_output(model, tokens, out)


@torch.no_grad()
def test_sd1_clip_skip_2_is_penultimate_hidden_state_then_final_layer_norm(sd1):
    hf, model, tokens, _, out = sd1
    final_layer_norm = getattr(hf, "text_model", hf).final_layer_norm   # transformers >= 5.6 has no text_model
    ref = final_layer_norm(out.hidden_states[-2])         # A1111's CLIP skip 2
    std = assert_close(model(tokens, clip_skip=2), ref, "SD1 clip_skip=2 vs transformers")
    assert (out.last_hidden_state - ref).abs().max() > 100 * TOL * std  # and it is not the last layer
    ref12 = final_layer_norm(out.hidden_states[1])        # clip_skip=12: after the first block
    assert_close(model(tokens, clip_skip=12), ref12, "SD1 clip_skip=12 vs transformers")


@torch.no_grad()
def test_math_and_sdpa_paths_agree_at_model_level(sd1):
    _, model, tokens, _, _ = sd1
    fast = model(tokens)
    model.set_fast_attention(False)
    try:
        slow = model(tokens)
    finally:
        model.set_fast_attention(True)
    # same fp32 math, different kernels: the same 1e-4 x std budget as against the references
    assert_close(slow, fast, "SD1 math path vs SDPA")


def test_transformers_key_map_round_trips(sd1):
    hf, model, _, unused, _ = sd1
    theirs = {"text_model." + k.removeprefix("text_model."): v for k, v in hf.state_dict().items()}
    back = to_transformers(model.state_dict())
    assert set(back) == {k for k in theirs if k not in unused}
    assert all(torch.equal(back[k], theirs[k]) for k in back)
    # transformers >= 5.6 saves without `text_model.`; the SD1 file has `transformer.text_model.`
    for prefix in ("", "transformer.text_model."):
        renamed = {prefix + k.removeprefix("text_model."): v for k, v in theirs.items()}
        ours, _ = from_transformers(renamed, SD1_TEXT)
        assert all(torch.equal(ours[k], v) for k, v in model.state_dict().items())


def test_transformers_unused_keys_are_kept_verbatim(sd1):
    hf, _, _, _, _ = sd1
    sd = dict(hf.state_dict())
    extra = {"text_model.embeddings.position_ids": torch.arange(77)[None], "text_projection.weight": torch.ones(3)}
    ours, unused = from_transformers({**sd, **extra}, SD1_TEXT)
    assert set(unused) >= set(extra) and all(unused[k] is v for k, v in extra.items())
    assert not any("position_ids" in k or "projection.weight" == k[-17:] for k in ours)


def test_key_map_errors_name_the_key(sd1):
    hf, model, _, _, _ = sd1
    sd = {"text_model." + k.removeprefix("text_model."): v for k, v in hf.state_dict().items()}
    with pytest.raises(ValueError, match="text_model.encoder.layers.0.mystery"):
        from_transformers({**sd, "text_model.encoder.layers.0.mystery": torch.zeros(1)}, SD1_TEXT)
    missing = {k: v for k, v in sd.items() if k != "text_model.encoder.layers.5.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=r"resblocks.5.mlp.c_proj.bias"):
        from_transformers(missing, SD1_TEXT)
    with pytest.raises(ValueError, match="layers.7.self_attn.v_proj.weight"):
        from_transformers({k: v for k, v in sd.items() if k != "text_model.encoder.layers.7.self_attn.v_proj.weight"})
    bad = {**sd, "text_model.final_layer_norm.weight": torch.ones(1024)}
    with pytest.raises(ValueError, match=r"ln_final.weight.*\(1024,\)"):
        from_transformers(bad, SD1_TEXT)
    with pytest.raises(ValueError, match="missing text-encoder key 'transformer.resblocks.11"):
        from_open_clip({k: v for k, v in model.state_dict().items() if ".11." not in k}, SD1_TEXT)
    with pytest.raises(ValueError, match="unknown text-encoder key 'visual.proj'"):
        from_open_clip({**model.state_dict(), "visual.proj": torch.zeros(1)}, SD1_TEXT)


def test_bad_inputs_raise_clear_errors(sd1):
    _, model, tokens, _, _ = sd1
    for bad, match in [(tokens.float(), "integer tensor"), (tokens[0], r"shape \(B, N\)"),
                       (torch.zeros(1, 78, dtype=torch.long), "78 tokens"),
                       (torch.full((1, 5), 49408), "token ids")]:
        with pytest.raises(ValueError, match=match):
            model(bad)
    for skip in (0, 13, 1.5):
        with pytest.raises(ValueError, match="clip_skip"):
            model(tokens, clip_skip=skip)
    assert model(tokens[:, :10]).shape == (2, 10, 768)   # shorter sequences are fine (causal: same prefix)
    assert torch.allclose(model(tokens[:, :10]), model(tokens[:, :12])[:, :10], atol=1e-5)


# ------------------------------------------------------------ SD2: OpenCLIP ViT-H/14 text (open_clip, LDM) ---

@pytest.fixture(scope="module")
def sd2():
    """OpenCLIP-H's text tower, built by the same open_clip function create_model("ViT-H-14") uses for it
    (`_build_text_tower` with the ViT-H-14 config; the 632M-parameter vision tower is irrelevant here and would
    cost ~20 s to initialise), and the reference output computed once: LDM FrozenOpenCLIPEmbedder(layer=
    "penultimate").encode_with_transformer, written in open_clip 3's (N, L, D) layout."""
    import open_clip
    cfg = open_clip.get_model_config("ViT-H-14")
    tower = build_on_meta(lambda: open_clip.model._build_text_tower(cfg["embed_dim"], cfg["text_cfg"]), seed=2)
    ours, unused = from_open_clip({"model." + k: v for k, v in tower.state_dict().items()}, SD2_TEXT)
    model = load_ours(SD2_TEXT, ours)
    tokens = Tokenizer(pad_id=SD2_TEXT.pad_id)(PROMPTS)
    with torch.no_grad():
        x = tower.token_embedding(tokens) + tower.positional_embedding
        for block in tower.transformer.resblocks[:-1]:                 # resblocks 0..22
            x = block(x, attn_mask=tower.attn_mask)
        penultimate = tower.ln_final(x)
        last = tower.ln_final(tower.transformer.resblocks[-1](x, attn_mask=tower.attn_mask))
        out = model(tokens)
    yield tower, model, tokens, unused, out, penultimate, last
    del tower, model, out, penultimate, last
    gc.collect()


def test_open_clip_h_config_is_sd2_text():
    import open_clip
    text = open_clip.get_model_config("ViT-H-14")["text_cfg"]
    assert (text["width"], text["heads"], text["layers"]) == (SD2_TEXT.width, SD2_TEXT.heads, SD2_TEXT.source_layers)
    assert not open_clip.get_model_config("ViT-H-14").get("quick_gelu", False) and SD2_TEXT.activation == "gelu"


@torch.no_grad()
def test_sd2_matches_open_clip_penultimate_layer(sd2):
    _, model, tokens, _, out, penultimate, last = sd2
    assert out.shape == (2, 77, 1024)
    std = assert_close(out, penultimate, "SD2 vs open_clip penultimate")
    assert_one_token_moves_output(model, tokens, out)
    assert (out - last).abs().max() > 100 * TOL * std   # the 24th block is really left out


@torch.no_grad()
def test_sd2_matches_ldm_frozen_open_clip_embedder(sd2):
    """The original SD2 code itself. Its __init__ downloads the weights, so it is assembled around the random
    tower; it was written for open_clip 2.0 (sequence-first attention) and permutes to (L, N, D), so the
    blocks' attention is switched back to sequence-first for this call."""
    from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder
    tower, _, tokens, _, out, _, _ = sd2
    embedder = FrozenOpenCLIPEmbedder.__new__(FrozenOpenCLIPEmbedder)
    torch.nn.Module.__init__(embedder)
    embedder.model, embedder.layer, embedder.layer_idx, embedder.device = tower, "penultimate", 1, "cpu"
    attns = [b.attn for b in tower.transformer.resblocks]
    for a in attns:
        a.batch_first = False
    try:
        ref = embedder.encode_with_transformer(tokens[:1])   # one prompt: the reference is slow
    finally:
        for a in attns:
            a.batch_first = True
        del embedder.model
    assert_close(out[:1], ref, "SD2 vs ldm FrozenOpenCLIPEmbedder(penultimate)")


@torch.no_grad()
def test_sd2_matches_diffusers_text_encoder(sd2):
    """diffusers ships SD2's encoder as a 23-layer transformers CLIPTextModel with exact gelu."""
    _, model, tokens, _, out, _, _ = sd2
    hf = hf_text_model(SD2_TEXT, seed=None)   # every parameter is loaded below (strict): no re-draw needed
    prefix = "text_model." if hasattr(hf, "text_model") else ""   # transformers >= 5.6 has no text_model
    theirs = {prefix + k.removeprefix("text_model."): v for k, v in to_transformers(model.state_dict()).items()}
    missing, unexpected = hf.load_state_dict(theirs, strict=False)
    assert not unexpected and not missing
    assert_close(out, hf(input_ids=tokens).last_hidden_state, "SD2 vs transformers (23 layers)")
    ours, _ = from_transformers(hf.state_dict(), SD2_TEXT)   # and back
    assert all(torch.equal(ours[k], v) for k, v in model.state_dict().items())
    del hf
    gc.collect()


def test_open_clip_key_map_and_unused(sd2):
    tower, model, _, unused, _, _, _ = sd2
    assert set(unused) == {"model.text_projection"} | {f"model.transformer.resblocks.23.{k}"
                                                       for k in tower.transformer.resblocks[23].state_dict()}
    theirs = tower.state_dict()
    assert all(unused[k].data_ptr() == theirs[k.removeprefix("model.")].data_ptr() for k in unused)   # verbatim
    back = {**to_open_clip(model.state_dict()), **{k.removeprefix("model."): v for k, v in unused.items()}}
    assert set(back) == set(theirs) and all(torch.equal(back[k], theirs[k]) for k in back)


@pytest.mark.slow
@torch.no_grad()
def test_sd2_matches_open_clip_create_model_vit_h_14():
    """The full open_clip.create_model("ViT-H-14") object, as LDM builds it (vision tower deleted), ~40 s:
    its text weights convert and its penultimate layer + ln_final is minisd's output."""
    import open_clip
    clip = open_clip.create_model("ViT-H-14", pretrained=None).eval()
    del clip.visual                                   # as FrozenOpenCLIPEmbedder does
    gc.collect()
    redraw_(clip, seed=5)
    ours, unused = from_open_clip({"model." + k: v for k, v in clip.state_dict().items()}, SD2_TEXT)
    assert {"model.logit_scale", "model.text_projection"} <= set(unused)
    model = load_ours(SD2_TEXT, ours)
    tokens = Tokenizer(pad_id=SD2_TEXT.pad_id)(PROMPTS[:1])
    x = clip.token_embedding(tokens) + clip.positional_embedding
    for block in clip.transformer.resblocks[:-1]:
        x = block(x, attn_mask=clip.attn_mask)
    assert_close(model(tokens), clip.ln_final(x), "SD2 vs open_clip.create_model ViT-H-14 penultimate")
