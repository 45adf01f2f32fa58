"""Textual-inversion files in every format give diffusers' images, and the words are found in prompts as A1111 and
diffusers find them.

Parity: a random embedding file loaded by minisd (Pipeline.load_embeddings) and by diffusers'
load_textual_inversion gives images within 2/255 (max abs pixel difference in [0, 1], fp32 CPU: the issue's
figure, as in test_pipeline.py). The embeddings move pixels far more than that, and vectors in the wrong order or
at the wrong scale are caught (test_embedding_parity_can_fail).
"""
import numpy as np
import pytest
import torch

from checkpoints import SMALL_SD1, SMALL_SD2, build_pair
from minisd import embeddings
from minisd.cli import main

TOL = 2 / 255
PROMPT = "a <cat-toy> on a beach, highly detailed"


pytestmark = pytest.mark.usefixtures("one_thread")      # conftest.py: small tensors, one thread


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return build_pair(tmp_path_factory, SMALL_SD1, seed=1)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return build_pair(tmp_path_factory, SMALL_SD2, seed=2)


def vectors(n, width=64, seed=0):
    # the token table's scale (std 1/sqrt(width)) times 3: a word that clearly changes the image
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 3 / width ** 0.5


def write(path, fmt, token, v):
    """One embedding file in each format users have."""
    if fmt == "diffusers":
        embeddings.save_diffusers(path, token, v)
    elif fmt == "diffusers-1d.bin":               # sd-concepts-library: torch.save({token: (dim,)})
        torch.save({token: v[0]}, path)
    elif fmt == "a1111.pt":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v.clone().requires_grad_()},
                    "name": token, "step": 3000, "sd_checkpoint": "abcdef", "sd_checkpoint_name": "model"}, path)
    elif fmt == "emb_params":
        embeddings.save_a1111(path, v)
    return path


def _np(images):
    return np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])


def ours_image(pipe, prompt=PROMPT):
    return _np(pipe.generate(prompt, "", 4, 7.5, "euler", "linspace", seed=3, width=32, height=32).images)


def theirs_image(ref, path=None, token=None, prompt=PROMPT):
    import diffusers
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.sd_scheduler_config,
                                                                 timestep_spacing="linspace")
    if path:
        ref.load_textual_inversion(str(path), token=token)
    try:
        return ref(prompt, num_inference_steps=4, guidance_scale=7.5, generator=torch.Generator().manual_seed(3),
                   width=32, height=32, output_type="np").images
    finally:
        if path:
            ref.unload_textual_inversion()


def _fresh(pipe):
    pipe.embeddings = embeddings.Embeddings(pipe.model.config.text)


CASES = [("sd1", "diffusers", 3), ("sd1", "diffusers-1d.bin", 1), ("sd1", "a1111.pt", 2), ("sd1", "emb_params", 2),
         ("sd2", "diffusers", 2), ("sd2", "a1111.pt", 3)]


@pytest.mark.parametrize("model,fmt,n", CASES, ids=[f"{m}-{f}-{n}vec" for m, f, n in CASES])
def test_embedding_file_gives_diffusers_image(request, tmp_path, model, fmt, n):
    ours, ref, _ = request.getfixturevalue(model)
    suffix = "" if "." in fmt else ".safetensors"
    # emb_params files name no word: A1111 takes the file's stem, diffusers needs token=
    path = write(tmp_path / (f"cattoy{suffix}" if fmt == "emb_params" else f"{fmt}{suffix}"), fmt, "<cat-toy>",
                 vectors(n, seed=n))
    prompt = PROMPT.replace("<cat-toy>", "cattoy") if fmt == "emb_params" else PROMPT
    _fresh(ours)
    assert ours.load_embeddings([str(path)]) == ["cattoy" if fmt == "emb_params" else "<cat-toy>"]
    mine = ours_image(ours, prompt)
    _fresh(ours)
    without = ours_image(ours, prompt)
    theirs = theirs_image(ref, path, "cattoy" if fmt == "emb_params" else None, prompt)
    err, effect = np.abs(mine - theirs).max(), np.abs(without - theirs).max()
    print(f"[parity] max abs pixel error {err:.5f}; the embedding moved pixels by up to {effect:.3f}")
    assert effect > 10 * TOL
    assert err <= TOL, f"max abs pixel error {err:.4f}"


def test_embedding_parity_can_fail(sd1, tmp_path):
    ours, ref, _ = sd1
    v = vectors(3, seed=3)
    theirs = theirs_image(ref, write(tmp_path / "e.safetensors", "diffusers", "<cat-toy>", v))
    for wrong in (v.flip(0), v * 0.8):
        _fresh(ours)
        ours.embeddings.add("<cat-toy>", wrong)
        err = np.abs(ours_image(ours) - theirs).max()
        print(f"[can fail] {err:.4f}")
        assert err > 3 * TOL
    _fresh(ours)


def test_vectors_enter_the_text_encoder_as_token_rows_would():
    """TextEncoder.forward's `extra` rows stand in for token rows: an embedding equal to some tokens' rows must give
    exactly what those tokens give."""
    from minisd.clip import TextEncoder
    torch.manual_seed(0)
    enc = TextEncoder(SMALL_SD1.text).eval()
    emb = embeddings.Embeddings(SMALL_SD1.text)
    ids = torch.tensor([[49406, 320, 1929, 525, 49407] + [49407] * 72])
    emb.add("<w>", enc.token_embedding.weight[[320, 1929]].detach())
    with_placeholders = ids.clone()
    with_placeholders[0, 1:3] = torch.tensor([49408, 49409])
    with torch.no_grad():
        assert torch.equal(emb.encode(enc, with_placeholders), enc(ids))


def test_words_are_found_as_diffusers_and_a1111_find_them(sd1):
    ours, _, _ = sd1
    tok = ours.model.tokenizer
    e = embeddings.Embeddings(SMALL_SD1.text)
    e.add("<cat-toy>", vectors(2))
    e.add("<cat-toy-2>", vectors(1))
    e.add("easyneg", vectors(1))
    enc = lambda text: e.tokenize(text, tok.encode)
    V = SMALL_SD1.text.vocab_size
    assert enc("a <Cat-Toy>, beach") == tok.encode("a ") + [V, V + 1] + tok.encode(", beach")
    assert enc("<cat-toy-2><cat-toy>") == [V + 2, V, V + 1]                  # longest name first
    assert enc("easyneg, myeasyneg easynegs") == [V + 3] + tok.encode(", myeasyneg easynegs")
    with pytest.raises(embeddings.EmbeddingError, match="loaded already"):
        e.add("EasyNeg", vectors(1))


def test_width_of_another_model_is_a_clear_error(sd1, tmp_path):
    ours, _, _ = sd1
    path = write(tmp_path / "sd1.safetensors", "diffusers", "<x>", vectors(1, width=768))
    with pytest.raises(embeddings.EmbeddingError, match="width 768 \\(an SD1 embedding\\), but this model's text "
                                                        "encoder is 64 wide"):
        ours.load_embeddings([str(path)])


def test_writers_give_files_diffusers_and_a1111_read(tmp_path):
    from safetensors.torch import load_file
    v = vectors(2)
    embeddings.save_diffusers(tmp_path / "learned_embeds.safetensors", "<cat-toy>", v)
    embeddings.save_a1111(tmp_path / "cat-toy.safetensors", v)
    assert torch.equal(load_file(tmp_path / "learned_embeds.safetensors")["<cat-toy>"], v)
    a1111 = load_file(tmp_path / "cat-toy.safetensors")         # A1111: one tensor in the dict, named by the stem
    assert list(a1111) == ["emb_params"] and torch.equal(a1111["emb_params"], v)
    assert embeddings.read(tmp_path / "learned_embeds.safetensors")[0] == "<cat-toy>"
    assert embeddings.read(tmp_path / "cat-toy.safetensors")[0] is None


def test_a1111_pt_is_read_without_running_its_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"string_to_param": {"*": Evil()}, "name": "x"}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refusing to load"):
        embeddings.read(tmp_path / "evil.pt")


def test_cli_embedding_flags(sd1, tmp_path, capsys):
    _, _, d = sd1
    folder = tmp_path / "embeddings"
    folder.mkdir()
    v = vectors(2, seed=5)
    write(folder / "cat-toy.pt", "a1111.pt", "something-else", v)           # the folder names it by its stem
    single = write(tmp_path / "learned_embeds.safetensors", "diffusers", "<cat-toy>", v)

    def run(prompt, out, *extra):
        return main(["generate", prompt, "--model", str(d / "model.safetensors"), "--steps", "2", "--width", "32",
                     "--height", "32", "--seed", "1", "--out", str(tmp_path / out), "--device", "cpu", *extra])
    assert run("a cat-toy", "dir.png", "--embeddings-dir", str(folder)) == 0
    assert run("a <cat-toy>", "file.png", "--embedding", str(single)) == 0
    assert run("a cat-toy", "none.png") == 0
    from PIL import Image
    a, b, c = (np.asarray(Image.open(tmp_path / n)).astype(int) for n in ("dir.png", "file.png", "none.png"))
    assert np.abs(a - b).max() <= 2        # oneDNN chosen per run by timing: rounding differences only
    assert np.abs(a - c).max() > 10
    capsys.readouterr()
    wide = write(tmp_path / "wide.safetensors", "diffusers", "<w>", vectors(1, width=1024))
    assert run("a <w>", "x.png", "--embedding", str(wide)) == 2
    err = capsys.readouterr().err
    assert "width 1024 (an SD2 embedding)" in err and err.count("\n") == 1


def test_the_png_records_the_embeddings_the_prompts_use_as_a1111_ti_hashes(tmp_path):
    # A1111 (modules/sd_hijack_clip.py) writes `TI hashes: "NAME: SHORTHASH, ..."` for the embeddings a prompt
    # uses; the shorthash is the first 12 hex digits of the SHA-256 of the whole file (Embedding.set_hash)
    import hashlib
    from minisd.images import parse_a1111_parameters, read_png_parameters
    folder = tmp_path / "embeddings"
    folder.mkdir()
    teal = write(folder / "teal.safetensors", "emb_params", None, vectors(1, seed=1))
    write(folder / "unused.safetensors", "emb_params", None, vectors(1, seed=2))
    single = write(tmp_path / "learned_embeds.safetensors", "diffusers", "<cat-toy>", vectors(2, seed=3))
    short = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()[:12]

    def params(prompt, negative):
        out = tmp_path / f"{len(list(tmp_path.glob('*.png')))}.png"
        assert main(["generate", prompt, "--negative-prompt", negative, "--embeddings-dir", str(folder),
                     "--embedding", str(single), "--steps", "1", "--width", "32", "--height", "32", "--device",
                     "cpu", "--out", str(out)]) == 0
        return parse_a1111_parameters(read_png_parameters(out))
    # the prompt's words first, then the negative prompt's; each once; the unused file not at all
    assert params("a <CAT-TOY> circle", "teal, <cat-toy>")["TI hashes"] == \
        f"<cat-toy>: {short(single)}, teal: {short(teal)}"
    assert "TI hashes" not in params("a circle", "blurry")
