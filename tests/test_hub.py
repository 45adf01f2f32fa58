"""`--model owner/repo` and `--model owner/repo/file.safetensors` (minisd/hub.py), against the hub imitation of
test_download.py on 127.0.0.1 (HF_ENDPOINT points at it; no real host is contacted). The repository holds the
tiny built-in model converted to a diffusers folder, plus files minisd must not fetch (the pickled .bin form,
the safety checker)."""
import hashlib
import socket
from pathlib import Path

import pytest
import torch

from minisd import cli, convert, hub
from minisd.cli.serve import listed_name
from minisd.download import ChecksumError, DownloadError
from minisd.model import load_model, locate, tiny_model_path
from test_download import TIMEOUT, Hub

REPO = "someone/tiny-sd"
NOT_NEEDED = ("unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.safetensors",
              "safety_checker/model.safetensors", "README.md")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tiny model as a diffusers folder: {repo path: bytes}, and the folder itself (the local reference)."""
    folder = tmp_path_factory.mktemp("tiny-diffusers") / "tiny-sd"
    convert.convert(tiny_model_path(), folder, "diffusers")
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    files.update({f: b"not for minisd " + f.encode() for f in NOT_NEEDED})
    return files, folder


def served(files, repo=REPO, bad=()):
    """Hub arguments for `files` under `repo`: resolve paths, their SHA-256 (wrong for paths in `bad`), the
    model API's answer."""
    resolve = {f"/{repo}/resolve/main/{f}": b for f, b in files.items()}
    etags = {f"/{repo}/resolve/main/{f}": hashlib.sha256(b + (b"x" if f in bad else b"")).hexdigest()
             for f, b in files.items()}
    api = {f"/api/models/{repo}": {"id": repo, "siblings": [{"rfilename": f} for f in files]}}
    return dict(files=resolve, etags=etags, api=api)


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A fresh cache, no token, online; the endpoint is set per test."""
    monkeypatch.setenv("MINISD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "MINISD_HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def fetched_files(hub_server):
    resolve = f"/{REPO}/resolve/main/"
    return sorted(p.removeprefix(resolve) for m, p, _ in hub_server.requests if m == "GET" and p.startswith(resolve))


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_a_repository_is_fetched_once_and_loads_as_the_same_folder_on_disk(tiny_folder, env):
    files, folder = tiny_folder
    with Hub(**served(files)) as server:
        env.setenv("HF_ENDPOINT", server.url)
        path, name = locate(REPO, log=lambda *a: None)
    assert name == "tiny-sd" and Path(path) == hub.repo_folder(REPO)
    # only what minisd reads: not the fp16 variant or the .bin beside the fp32 safetensors, no safety checker
    assert fetched_files(server) == sorted(f for f in files if f not in NOT_NEEDED)
    ours, reference = load_model(path, verbose=False).state_dict(), load_model(folder, verbose=False).state_dict()
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)

    env.setenv("HF_ENDPOINT", closed_port_url())              # the second time: from the cache, no request
    assert locate(REPO, log=lambda *a: None)[0] == path


def test_a_part_file_is_resumed_from_where_it_stopped(tiny_folder, env):
    files, _ = tiny_folder
    weights = "unet/diffusion_pytorch_model.safetensors"
    part = hub.repo_folder(REPO) / (weights + ".part")
    part.parent.mkdir(parents=True)
    half = len(files[weights]) // 2
    part.write_bytes(files[weights][:half])                    # an earlier run was cut here
    with Hub(**served(files)) as server:
        env.setenv("HF_ENDPOINT", server.url)
        path = hub.fetch(REPO, progress=False, timeout=TIMEOUT, retry_wait=0, log=lambda *a: None)
    assert (path / weights).read_bytes() == files[weights]
    ranges = {p: r for m, p, r in server.requests if m == "GET" and p.startswith("/cdn")}
    assert ranges[f"/cdn/{REPO}/resolve/main/{weights}"] == f"bytes={half}-"
    assert ranges[f"/cdn/{REPO}/resolve/main/vae/diffusion_pytorch_model.safetensors"] == "bytes=0-"


def test_a_checksum_mismatch_deletes_the_file_and_the_folder_stays_incomplete(tiny_folder, env):
    files, _ = tiny_folder
    bad = "vae/diffusion_pytorch_model.safetensors"
    with Hub(**served(files, bad=(bad,))) as server:
        env.setenv("HF_ENDPOINT", server.url)
        with pytest.raises(ChecksumError, match="Checksum mismatch") as e:
            hub.fetch(REPO, progress=False, timeout=TIMEOUT, retry_wait=0, log=lambda *a: None)
    assert "\n" not in str(e.value)
    folder = hub.repo_folder(REPO)
    assert not (folder / bad).exists() and not (folder / (bad + ".part")).exists()
    assert not (folder / ".complete").exists()                # the next run fetches what is missing


def test_a_missing_repository_is_one_line(env, capsys):
    with Hub(files={}, api={}) as server:
        env.setenv("HF_ENDPOINT", server.url)
        code = cli.main(["generate", "x", "--model", "nobody/nothing", "--out", "x.png"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("minisd: error: no model repository nobody/nothing on http://127.0.0.1:") and "\n" not in err
    assert not Path("x.png").exists()


def test_a_single_file_of_a_repository(tiny_folder, env):
    data = Path(tiny_model_path()).read_bytes()
    with Hub(**served({"weights/tiny.safetensors": data})) as server:
        env.setenv("HF_ENDPOINT", server.url)
        path, name = locate(f"{REPO}/weights/tiny.safetensors", log=lambda *a: None)
        assert name == "tiny" and Path(path).read_bytes() == data
        with pytest.raises(DownloadError) as e:               # a file the repository lacks: one line, with its files
            hub.fetch(f"{REPO}/other.safetensors", progress=False, timeout=TIMEOUT, retry_wait=0, log=lambda *a: None)
    assert str(e.value) == f"{REPO} on {server.url} has no file other.safetensors; its checkpoint files: " \
                           "weights/tiny.safetensors"
    env.setenv("HF_ENDPOINT", closed_port_url())
    assert locate(f"{REPO}/weights/tiny.safetensors", log=lambda *a: None)[0] == path


def test_generate_with_a_repository_file_names_the_model_after_it(env):
    from minisd.images import parse_a1111_parameters, read_png_parameters
    data = Path(tiny_model_path()).read_bytes()
    with Hub(**served({"tiny.safetensors": data})) as server:
        env.setenv("HF_ENDPOINT", server.url)
        assert cli.main(["generate", "a red circle", "--model", f"{REPO}/tiny.safetensors", "--steps", "1",
                         "--width", "32", "--height", "32", "--device", "cpu", "--out", "a.png"]) == 0
    assert parse_a1111_parameters(read_png_parameters("a.png"))["Model"] == "tiny"


def test_offline_uses_the_cache_only(tiny_folder, env):
    files, _ = tiny_folder
    env.setenv("HF_HUB_OFFLINE", "1")
    with Hub(**served(files)) as server:
        env.setenv("HF_ENDPOINT", server.url)
        with pytest.raises(DownloadError) as e:
            hub.fetch(REPO, log=lambda *a: None)
        assert server.requests == []
    assert str(e.value).startswith(f"HF_HUB_OFFLINE=1 and {REPO} is not in the cache") and "\n" not in str(e.value)
    folder = hub.repo_folder(REPO)
    folder.mkdir(parents=True)
    (folder / ".complete").write_text("")
    assert hub.fetch(REPO, log=lambda *a: None) == folder


def test_the_token_goes_to_the_hub_and_not_to_the_cdn(tiny_folder, env, tmp_path):
    files, _ = tiny_folder
    (tmp_path / "hf-home").mkdir()
    (tmp_path / "hf-home" / "token").write_text("hf_from_login\n")    # what `huggingface-cli login` leaves
    data = {"model.safetensors": files["unet/diffusion_pytorch_model.safetensors"]}
    with Hub(**served(data)) as server:
        env.setenv("HF_ENDPOINT", server.url)
        hub.fetch(f"{REPO}/model.safetensors", progress=False, timeout=TIMEOUT, log=lambda *a: None)
        env.setenv("HF_TOKEN", "hf_from_env")                          # HF_TOKEN wins over the file
        hub.fetch(f"{REPO}/model.safetensors", cache=tmp_path / "other", progress=False, timeout=TIMEOUT,
                  log=lambda *a: None)
    sent = server.authorization
    assert [a for p, a in sent if not p.startswith("/cdn")] == ["Bearer hf_from_login"] * 2 + ["Bearer hf_from_env"] * 2
    assert [a for p, a in sent if p.startswith("/cdn")] == [None, None]


def test_which_names_are_repositories(env, tmp_path):
    assert hub.parse("someone/tiny-sd") == ("someone/tiny-sd", None)
    assert hub.parse("someone/tiny-sd/unet/x.safetensors") == ("someone/tiny-sd", "unet/x.safetensors")
    assert hub.parse("stabilityai/stable-diffusion-2-1/v2-1_768-ema-pruned.ckpt")[1] == "v2-1_768-ema-pruned.ckpt"
    for local in ("models/foo.safetensors",     # a missing local file, not repository "foo.safetensors"
                  "./someone/tiny-sd", "/abs/path", "~/x/y", "a/b/notes.txt", "../x/y", "one", "a/../b"):
        assert hub.parse(local) is None, local
    assert listed_name("someone/tiny-sd") == "tiny-sd"             # `minisd serve` lists it as generate names it
    (tmp_path / "someone" / "tiny-sd").mkdir(parents=True)      # an existing local path wins
    assert hub.parse("someone/tiny-sd") is None


def test_the_first_weights_form_present_is_chosen():
    base = [*hub.CONFIGS, *hub.TOKENIZER, "text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"]
    fp16_only = base + ["unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin"]
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in hub.choose_files(REPO, fp16_only, "E")
    assert "unet/diffusion_pytorch_model.bin" not in hub.choose_files(REPO, fp16_only, "E")
    bin_only = base + ["unet/diffusion_pytorch_model.bin"]
    assert "unet/diffusion_pytorch_model.bin" in hub.choose_files(REPO, bin_only, "E")
    with pytest.raises(DownloadError, match=r"lacks unet/ weights"):
        hub.choose_files(REPO, base, "E")
    with pytest.raises(DownloadError, match=r"not a diffusers folder .* --model someone/tiny-sd/a.ckpt"):
        hub.choose_files(REPO, ["a.ckpt", "README.md"], "E")
