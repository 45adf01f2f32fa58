"""`--model owner/repo` and `--model owner/repo/file.safetensors`: a model from any Hugging Face repository,
fetched once into the cache with download.py's resumable, checksummed download.

- `owner/repo` is a diffusers folder. The repository's file list (GET {endpoint}/api/models/{repo}, its
  `siblings`, the listing huggingface_hub's `list_repo_files` reads) says what is there, and only the files
  minisd reads are fetched: model_index.json, scheduler/scheduler_config.json, the config.json of unet/, vae/ and
  text_encoder/, tokenizer/ (vocab.json, merges.txt and the two files that name the pad token) and one weights
  file per network, the first the repository has of WEIGHTS: safetensors before the pickled .bin, full precision
  before diffusers' fp16 "variant". safety_checker/, feature_extractor/, the other weights forms are not fetched.
- `owner/repo/path/file.safetensors` (or .ckpt) is that one file of the repository.

Each file is https://huggingface.co/{repo}/resolve/main/{path}, checked against the SHA-256 the hub announces
(X-Linked-Etag of an LFS file) or its git blob id (a small file kept in git), downloaded through `.part` with
HTTP Range resumption, and cached at cache_dir() / "hub" / "{owner}--{repo}" / path. A folder gets an empty
`.complete` once every file is there; from then on it is used without a request, as a single file is once it
exists.

Which a `--model` name means (model.locate): no name is the tiny model, sd15 / sd21 / sd21-base the named models,
then **an existing local path is always that path**; only a name that is no local path and has the Hub's shape
(owner/repo, or owner/repo/file with a checkpoint suffix; letters, digits, `-`, `_`, `.`) is a repository. Write
`./owner/repo` to mean a local folder that does not exist yet (the error then says so), or to make sure a
local one is meant.

The environment, as huggingface_hub reads it: HF_ENDPOINT replaces https://huggingface.co (MINISD_HF_ENDPOINT
wins over it); HF_TOKEN, else the file $HF_HOME/token that `huggingface-cli login` writes (HF_HOME defaults to
~/.cache/huggingface), is sent as `Authorization: Bearer` to the endpoint (download._auth); HF_HUB_OFFLINE=1
uses the cache only: a model that is not there is one line. The cache itself is minisd's ($MINISD_CACHE), not
huggingface_hub's blobs/snapshots tree, so a model already in ~/.cache/huggingface/hub is fetched again. Only
the `main` revision is fetched.
"""
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

from . import download
from .download import DownloadError

# the files of a diffusers folder minisd reads (weights_convert/diffusers.py, tokenizer.Tokenizer.from_diffusers)
CONFIGS = ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json",
           "text_encoder/config.json")
TOKENIZER = ("tokenizer/vocab.json", "tokenizer/merges.txt")
OPTIONAL = ("tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json")   # fetched where present
WEIGHTS = {   # per network, in order of preference: the first the repository has is fetched
    part: tuple(f"{part}/{stem}{variant}{suffix}" for suffix in (".safetensors", ".bin") for variant in ("", ".fp16"))
    for part, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model"))}
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

_PART = r"[A-Za-z0-9](?:[\w.-]*[\w])?"        # the Hub's owner and repository names
_REPO_ID = re.compile(rf"({_PART})/({_PART})(/(?:[\w.-]+/)*[\w.-]+)?")


def parse(name):
    """(repo, file) when `name` has the Hub's shape and is no local path, file None for a folder; else None."""
    if not isinstance(name, str) or not name or os.path.exists(name) or "\\" in name:
        return None
    match = _REPO_ID.fullmatch(name)
    if not match:
        return None
    owner, repo, file = match.group(1), match.group(2), match.group(3)
    if ".." in (owner, repo) or (file and ".." in PurePosixPath(file).parts):
        return None
    if file is None and repo.lower().endswith(CHECKPOINT_SUFFIXES):
        return None                   # models/foo.safetensors: a local file that is missing, not a repository
    if file is not None and not file.lower().endswith(CHECKPOINT_SUFFIXES):
        return None
    return f"{owner}/{repo}", file and file[1:]


def display_name(name):
    """What a repository model is called in PNG parameters and model lists: the folder's (repository's) name, or
    the file's stem, as A1111 names a local model."""
    repo, file = parse(name)
    return PurePosixPath(file).stem if file else repo.split("/")[1]


def repo_folder(repo, cache=None):
    return Path(cache or download.cache_dir()) / "hub" / repo.replace("/", "--")


def fetch(name, cache=None, progress=True, timeout=30.0, retries=5, retry_wait=2.0, log=print):
    """The local path of repository model `name` (a folder or a file), fetched into the cache if not there."""
    repo, file = parse(name)
    folder = repo_folder(repo, cache)
    target = folder / file if file else folder
    done = target if file else folder / ".complete"
    if done.exists():
        return target
    endpoint = download.hub_endpoint()
    if offline():
        raise DownloadError(f"HF_HUB_OFFLINE=1 and {name} is not in the cache (expected at {target}); unset "
                            f"HF_HUB_OFFLINE to fetch it from {endpoint}")
    settings = (progress, timeout, retries, retry_wait)

    def get(path):
        url = f"{endpoint}/{repo}/resolve/main/{urllib.parse.quote(path)}"
        if not (folder / path).exists():
            download._fetch_file(f"{repo} file {path}", url, folder / path, None, *settings)

    if file:
        log(f"minisd: fetching {file} from {endpoint}/{repo} into {folder}")
        try:
            get(file)
        except DownloadError as e:
            if "HTTP 401" in str(e) or "HTTP 404" in str(e):      # one line: the repository or file is not there
                listed = list_files(repo, endpoint, timeout)
                raise DownloadError(f"{repo} on {endpoint} has no file {file}; its checkpoint files: "
                                    f"{', '.join(f for f in listed if f.endswith(CHECKPOINT_SUFFIXES)) or 'none'}") \
                    from None
            raise
        return target
    files = choose_files(repo, list_files(repo, endpoint, timeout), endpoint)
    log(f"minisd: fetching {len(files)} files of the diffusers folder {endpoint}/{repo} into {folder}")
    for path in files:
        get(path)
    done.write_text("")
    return folder


def offline():
    """HF_HUB_OFFLINE set to a true value, as huggingface_hub reads it."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def list_files(repo, endpoint, timeout=30.0):
    """The repository's file paths, from the Hub's model API (`siblings`); a missing repository is one line."""
    url = f"{endpoint}/api/models/{repo}"
    try:
        with urllib.request.urlopen(download._auth(urllib.request.Request(url)), timeout=timeout) as response:
            info = json.load(response)
    except urllib.error.HTTPError as e:
        if e.code in (401, 404):      # the Hub answers 401 for a repository that does not exist (or is private)
            raise DownloadError(f"no model repository {repo} on {endpoint} (HTTP {e.code}; a private or gated one "
                                f"needs HF_TOKEN), and no local path {repo} either") from None
        raise DownloadError(f"listing {repo} on {endpoint} failed: HTTP {e.code} {e.reason}") from None
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"could not list {repo} on {endpoint} ({reason}); with HF_HUB_OFFLINE=1 only models "
                            f"already in {download.cache_dir()} are used") from None
    return [s["rfilename"] for s in info.get("siblings", []) if "rfilename" in s]


def choose_files(repo, listed, endpoint):
    """The files of a diffusers folder minisd needs, out of the repository's `listed` paths (module docstring)."""
    have = set(listed)
    if "unet/config.json" not in have:
        example = next((f for f in listed if f.endswith(CHECKPOINT_SUFFIXES)), "FILE.safetensors")
        raise DownloadError(f"{endpoint}/{repo} is not a diffusers folder (no unet/config.json); name one of its "
                            f"files instead, e.g. --model {repo}/{example}")
    missing = [f for f in CONFIGS + TOKENIZER if f not in have and f != "scheduler/scheduler_config.json"]
    weights = []
    for part, choices in WEIGHTS.items():
        found = next((f for f in choices if f in have), None)
        if found is None:
            missing.append(f"{part}/ weights ({' or '.join(choices)})")
        weights.append(found)
    if missing:
        raise DownloadError(f"{endpoint}/{repo} lacks {', '.join(missing)}: not a Stable Diffusion diffusers folder")
    return [f for f in CONFIGS + TOKENIZER + OPTIONAL if f in have] + weights
