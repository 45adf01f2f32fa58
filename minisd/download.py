"""Fetching the official files by name: `--model sd15`, `sd21`, `sd21-base` (one checkpoint file each, MODELS),
the captioners `blip-base`, `blip-large`, `blip2-opt-2.7b` (a transformers folder each, FOLDERS) and the
annotators' weights, e.g. `openpose-body` (one file each, FILES).

Each file is fetched from its official Hugging Face repository over plain HTTPS,
https://huggingface.co/{repo}/resolve/main/{file}, with urllib (no hub library):

- The file is cached at `cache_dir() / file`: `$MINISD_CACHE` if set, else `~/.cache/minisd`. A file already
  there is used as it is (it was checked when it was downloaded, or the user put it there).
- It downloads into `file.part` beside it and resumes with an HTTP Range request, after a cut connection in
  the same run (a few retries) or after an interrupted run; only a complete, checked file is renamed to its
  final name.
- The SHA-256 it must have comes from `expected_sha256` (explicit value > the one pinned below > what the hub
  says). A mismatch deletes the download and raises. `download` also takes only the first hex digits
  (`hash_prefix`, torch.hub's check for files named NAME-<first 8 hex digits of the SHA-256>.pth).
- Offline, the error says which URL to fetch by hand and the full path to put it at.
- `$MINISD_HF_ENDPOINT`, else `$HF_ENDPOINT` (or the `endpoint` argument) replaces https://huggingface.co, e.g.
  for a mirror; the tests point it at a small server on 127.0.0.1. A Hugging Face token ($HF_TOKEN, else
  $HF_HOME/token) is sent to that host (not to the CDN it redirects to). Any other repository: hub.py.

A named folder lives at `cache_dir() / "{owner}--{repo}"`, its files under their own names. Each is fetched as
above if it is not there yet; the weights of a sharded folder are its index `*.index.json` and the shards the
index names. An empty `.complete` file is written once all are there; from then on the folder is used as it is. Small files are not stored with Git LFS: the hub's ETag is then their git blob id (SHA-1 of
"blob {size}\\0" + bytes), which is checked instead of a SHA-256.
"""
import errno
import hashlib
import http.client
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .config import SD15, SD21_BASE, SD21_V, ModelConfig

DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class NamedModel:
    repo: str                  # Hugging Face repository
    filename: str              # the single-file checkpoint in it
    config: ModelConfig        # the network configuration the file is loaded with
    sha256: str | None = None  # pinned checksum where it is known from independent sources


MODELS = {
    # 4,265,146,304 bytes; the SHA-256 A1111 prints as [6ce0161689] when it loads this file
    "sd15": NamedModel("stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors", SD15,
                       sha256="6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"),
    "sd21": NamedModel("stabilityai/stable-diffusion-2-1", "v2-1_768-ema-pruned.safetensors", SD21_V),     # v, 768 px
    "sd21-base": NamedModel("stabilityai/stable-diffusion-2-1-base", "v2-1_512-ema-pruned.safetensors",
                            SD21_BASE),                                                                   # eps, 512 px
}


@dataclass(frozen=True)
class NamedFolder:
    """A transformers-layout model folder in a Hugging Face repository."""
    repo: str
    files: tuple               # fetched always (config, tokenizer, preprocessor files)
    weights: tuple = ("model.safetensors", "pytorch_model.bin")   # the first the repository has is fetched; an
    optional: tuple = ()       # index (*.index.json) brings its shards. `optional`: fetched where the repository
                               # has them (a 404 is skipped)


_BERT_TOKENIZER = dict(optional=("special_tokens_map.json", "tokenizer.json"))
FOLDERS = {
    "blip-base": NamedFolder("Salesforce/blip-image-captioning-base",
                             ("config.json", "preprocessor_config.json", "vocab.txt", "tokenizer_config.json"),
                             **_BERT_TOKENIZER),
    "blip-large": NamedFolder("Salesforce/blip-image-captioning-large",
                              ("config.json", "preprocessor_config.json", "vocab.txt", "tokenizer_config.json"),
                              **_BERT_TOKENIZER),
    "blip2-opt-2.7b": NamedFolder("Salesforce/blip2-opt-2.7b",
                                  ("config.json", "preprocessor_config.json", "tokenizer_config.json", "vocab.json",
                                   "merges.txt"),
                                  weights=("model.safetensors.index.json", "pytorch_model.bin.index.json"),
                                  optional=("special_tokens_map.json", "generation_config.json", "tokenizer.json",
                                            "added_tokens.json", "processor_config.json")),
}


@dataclass(frozen=True)
class NamedFile:
    """A single weights file that is not a Stable Diffusion checkpoint (an annotator's network)."""
    repo: str
    filename: str
    sha256: str | None = None  # pinned checksum where it is known from independent sources


FILES = {
    # The OpenPose body model (CMU's Caffe weights as converted by Hzzone/pytorch-openpose), the file ControlNet's
    # annotator and controlnet_aux load. Its SHA-256 could not be established from an independent source offline,
    # so none is pinned: the download is checked against the SHA-256 the hub announces for it (X-Linked-Etag).
    "openpose-body": NamedFile("lllyasviel/Annotators", "body_pose_model.pth"),
}


class DownloadError(RuntimeError):
    """A named model could not be fetched; the message says why and what to do instead."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not have the expected SHA-256; the download was deleted."""


def cache_dir() -> Path:
    """Where downloaded models live: $MINISD_CACHE, else ~/.cache/minisd."""
    return Path(os.environ.get("MINISD_CACHE") or Path.home() / ".cache" / "minisd").expanduser()


def hub_endpoint() -> str:
    """The hub's address: $MINISD_HF_ENDPOINT, else $HF_ENDPOINT (huggingface_hub's variable), else
    https://huggingface.co."""
    return (os.environ.get("MINISD_HF_ENDPOINT") or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def token() -> str | None:
    """The user's Hugging Face token as huggingface_hub finds it: $HF_TOKEN, else the file $HF_HOME/token that
    `huggingface-cli login` writes ($HF_HOME defaults to ~/.cache/huggingface); None without one."""
    if os.environ.get("HF_TOKEN", "").strip():
        return os.environ["HF_TOKEN"].strip()
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser()
    try:
        return (home / "token").read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _auth(request: urllib.request.Request) -> urllib.request.Request:
    """`request` with `Authorization: Bearer TOKEN` when it goes to the hub's host and a token is known. The
    header is "unredirected": urllib does not repeat it to the storage CDN a resolve URL redirects to (requests,
    which huggingface_hub uses, also drops it on a redirect to another host)."""
    key = token()
    if key and urllib.parse.urlsplit(request.full_url).netloc == urllib.parse.urlsplit(hub_endpoint()).netloc:
        request.add_unredirected_header("Authorization", f"Bearer {key}")
    return request


def model_url(name: str, endpoint: str | None = None) -> str:
    """https://huggingface.co/{repo}/resolve/main/{file}, with the endpoint from the argument, else hub_endpoint()."""
    model = _named(name)
    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    return f"{endpoint}/{model.repo}/resolve/main/{model.filename}"


def model_path(name: str, cache: Path | None = None) -> Path:
    """The path a named model is (or will be) cached at."""
    return Path(cache or cache_dir()) / _named(name).filename


def fetch_model(name: str, cache=None, endpoint: str | None = None, sha256: str | None = None,
                progress: bool = True, timeout: float = 30.0, retries: int = 5, retry_wait: float = 2.0) -> Path:
    """The local path of named model `name`, downloading it into the cache first if it is not there."""
    path = model_path(name, cache)
    if path.exists():
        return path
    _fetch_file(f"model '{name}'", model_url(name, endpoint), path, sha256, progress, timeout, retries, retry_wait,
                pinned=_named(name).sha256)
    return path


def folder_path(name: str, cache: Path | None = None) -> Path:
    """The folder a named transformers folder is (or will be) cached in."""
    return Path(cache or cache_dir()) / _named_folder(name).repo.replace("/", "--")


def fetch_folder(name: str, cache=None, endpoint: str | None = None, progress: bool = True, timeout: float = 30.0,
                 retries: int = 5, retry_wait: float = 2.0) -> Path:
    """The local folder of named transformers folder `name`, its missing files downloaded first."""
    spec = _named_folder(name)
    folder = folder_path(name, cache)
    complete = folder / ".complete"            # written last: every file is there (optional ones the hub lacks
    if complete.exists():                      # are not asked for again)
        return folder
    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    settings = (progress, timeout, retries, retry_wait)

    def get(file, optional=False):
        """The local path of `file`; None for an optional file the repository does not have."""
        path = folder / file
        if not path.exists():
            url = f"{endpoint}/{spec.repo}/resolve/main/{file}"
            if not _fetch_file(f"'{name}' file {file}", url, path, None, *settings, optional=optional):
                return None
        return path

    for file in spec.files:
        get(file)
    for file in spec.optional:
        get(file, optional=True)
    weights = next((path for path in (folder / w for w in spec.weights) if path.exists()), None)
    for file in spec.weights:                       # the first form the repository has
        weights = weights or get(file, optional=file != spec.weights[-1])
    if weights.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(weights.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, AttributeError):
            raise DownloadError(f"{weights} is not a weights index (no weight_map); delete it and run again") \
                from None
        for shard in shards:
            get(shard)
    complete.write_text("")
    return folder


def _fetch_file(label, url, path, sha256, progress, timeout, retries, retry_wait, pinned=None, optional=False):
    """Download one file to `path`, checked; errors as DownloadError saying what to do by hand. False for an
    optional file the server does not have (404), True when downloaded."""
    by_hand = f"Download this file:\n  {url}\nand put it at:\n  {path}"
    try:
        if sha256 or pinned:
            expected, blob = _check_hex(sha256) if sha256 else pinned, None
        else:
            expected, blob = _hub_checksums(url, timeout)
        download(url, path, expected, progress, timeout, retries, retry_wait, git_blob=blob)
        return True
    except urllib.error.HTTPError as e:
        if optional and e.code == 404:
            return False
        hint = {401: " (the repository may need a login or a licence accepted on its page)",
                403: " (the repository may need a login or a licence accepted on its page)",
                404: " (no such file: the repository may have moved or been removed)"}.get(e.code, "")
        raise DownloadError(f"Could not download {label}: HTTP {e.code} {e.reason} for {url}{hint}.\n"
                            f"{by_hand}") from None
    except (OSError, http.client.HTTPException) as e:
        if _is_offline(e):
            raise DownloadError(f"Could not reach {urllib.parse.urlsplit(url).netloc} to download {label} "
                                f"({e.reason}).\n{by_hand}\n"
                                f"(or set MINISD_CACHE to a directory that already holds {path.name})") from None
        raise DownloadError(f"Download of {label} from {url} failed ({e!r}).\n{by_hand}") from None


def expected_sha256(name: str, url: str, sha256: str | None = None, timeout: float = 30.0) -> str | None:
    """The SHA-256 the download must have: `sha256` if given, else the one pinned in MODELS, else the hub's.

    For a file stored with Git LFS, a HEAD request on the resolve URL answers with a redirect to the storage
    CDN whose `X-Linked-Etag` header is the file's SHA-256 in quotes; huggingface_hub's get_hf_file_metadata
    reads the same header (falling back to `ETag`) without following the redirect. Only a value that looks
    like a SHA-256 is used (a small non-LFS file's ETag is a git blob id instead); None when there is none.
    """
    if sha256:
        return _check_hex(sha256)
    if _named(name).sha256:
        return _named(name).sha256
    return _hub_checksums(url, timeout)[0]


def _hub_checksums(url: str, timeout: float):
    """(SHA-256, git blob SHA-1) the hub announces for a file, either None: an LFS file has the first (in
    X-Linked-Etag), a small file stored in git the second (its ETag)."""
    headers = _head_without_redirect(url, timeout)
    etag = headers.get("X-Linked-Etag") or headers.get("ETag") or ""
    etag = etag.removeprefix("W/").strip('"').lower()
    return (etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None,
            etag if re.fullmatch(r"[0-9a-f]{40}", etag) else None)


def download(url: str, path, sha256: str | None = None, progress: bool = True, timeout: float = 30.0,
             retries: int = 5, retry_wait: float = 2.0, hash_prefix: str | None = None,
             git_blob: str | None = None) -> Path:
    """Download `url` to `path` through `path.part`, resuming with HTTP Range; check `sha256` (or, where only
    its first hex digits are known, `hash_prefix`, as torch.hub.download_url_to_file does; or, for a small file
    kept in git, its `git_blob` id); rename.

    A connection that drops mid-file (or ends short of the announced length) is resumed from the bytes
    already on disk, up to `retries` times. A server that ignores Range (answers 200) restarts the file.
    """
    path = Path(path)
    part = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        try:
            if _fetch_into(url, part, progress, timeout):
                break
            reason = "connection closed before the end of the file"
        except (OSError, http.client.HTTPException) as e:
            if isinstance(e, urllib.error.HTTPError) or _is_offline(e):
                raise                      # not a dropped connection: retrying the same request will not help
            reason = repr(e)
        if attempt == retries:
            kept = part.stat().st_size if part.exists() else 0
            raise DownloadError(f"Download of {url} kept failing ({reason}); {kept} bytes are kept in {part} "
                                f"and the next run resumes from there")
        print(f"minisd: download interrupted ({reason}), resuming", file=sys.stderr)
        time.sleep(retry_wait * (attempt + 1))
    expected = sha256 or (hash_prefix and hash_prefix.lower())
    if git_blob and not expected:
        actual = git_blob_id(part)
        if actual != git_blob:
            part.unlink()
            raise ChecksumError(f"Checksum mismatch for {url}: expected git blob {git_blob}, got {actual}. "
                                f"The bad download was deleted; run again to retry.")
    elif not expected:
        print(f"minisd: warning: no SHA-256 known for {url}; the file is not checked", file=sys.stderr)
    else:
        actual = sha256_file(part)
        if not actual.startswith(expected):             # a full SHA-256 starts with itself only
            part.unlink()
            raise ChecksumError(f"Checksum mismatch for {url}: expected SHA-256 {expected}"
                                f"{'' if sha256 else '...'}, got {actual}. "
                                f"The bad download was deleted; run again to retry.")
    os.replace(part, path)
    return path


def _fetch_into(url: str, part: Path, progress: bool, timeout: float) -> bool:
    """One GET of the rest of the file, appended to `part`. True when the file is complete."""
    offset = part.stat().st_size if part.exists() else 0
    request = _auth(urllib.request.Request(url, headers={"Range": f"bytes={offset}-", "Accept-Encoding": "identity"}))
    try:
        response = urllib.request.urlopen(request, timeout=timeout)   # follows the redirect to the CDN
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset > 0:   # range not satisfiable: the part already holds the whole file
            return True
        raise
    with response:
        if response.status == 206:         # Content-Range: bytes start-end/total
            start, total = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", response.headers["Content-Range"]).groups()
            if int(start) != offset:
                raise DownloadError(f"{url} answered a request for bytes {offset}- with bytes {start}-")
            total = int(total)
        else:                              # 200: the server sent the whole file, not the range
            offset, total = 0, int(response.headers.get("Content-Length") or 0) or None
        with open(part, "ab" if offset else "wb") as f, \
                tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=part.name.removesuffix(".part"), disable=not progress) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    return total is None or size >= total


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def git_blob_id(path) -> str:
    """git's object id of a file: SHA-1 of "blob {size}\\0" followed by its bytes."""
    h = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None                        # urllib then raises the 3xx as an HTTPError, headers included


def _head_without_redirect(url: str, timeout: float, hops: int = 5):
    """Headers of a HEAD on `url`. Relative redirects (a renamed repository) are followed, the absolute one
    to the file storage is not: its headers are the ones that describe the file."""
    opener = urllib.request.build_opener(_NoRedirect)
    for _ in range(hops):
        request = _auth(urllib.request.Request(url, method="HEAD", headers={"Accept-Encoding": "identity"}))
        try:
            with opener.open(request, timeout=timeout) as response:
                return response.headers
        except urllib.error.HTTPError as e:
            location = e.headers.get("Location", "")
            if not 300 <= e.code < 400:
                raise
            if location.startswith("/"):
                url = urllib.parse.urljoin(url, location)
                continue
            return e.headers
    return {}


def _is_offline(error: BaseException) -> bool:
    """No connection to the server at all: DNS failure, refused or unreachable, or a connect timeout.
    (urllib wraps errors of the connection step in URLError; errors while reading come unwrapped.)"""
    if not isinstance(error, urllib.error.URLError) or isinstance(error, urllib.error.HTTPError):
        return False
    reason = error.reason
    return isinstance(reason, (socket.gaierror, ConnectionRefusedError, TimeoutError)) or (
        isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH))


def file_path(name: str, cache: Path | None = None) -> Path:
    """The path a named single file (FILES) is (or will be) cached at."""
    spec = _named_file(name)
    return Path(cache or cache_dir()) / spec.repo.replace("/", "--") / spec.filename


def fetch_file(name: str, cache=None, endpoint: str | None = None, sha256: str | None = None,
               progress: bool = True, timeout: float = 30.0, retries: int = 5, retry_wait: float = 2.0) -> Path:
    """The local path of named file `name` (FILES), downloading it into the cache first if it is not there."""
    spec = _named_file(name)
    path = file_path(name, cache)
    if path.exists():
        return path
    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    _fetch_file(f"file '{name}'", f"{endpoint}/{spec.repo}/resolve/main/{spec.filename}", path, sha256, progress,
                timeout, retries, retry_wait, pinned=spec.sha256)
    return path


def _check_hex(sha256: str) -> str:
    value = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError(f"expected a SHA-256 of 64 hex digits, got {sha256!r}")
    return value


def _named_folder(name: str) -> NamedFolder:
    if name not in FOLDERS:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(FOLDERS)}")
    return FOLDERS[name]


def _named_file(name: str) -> NamedFile:
    if name not in FILES:
        raise ValueError(f"unknown file name {name!r}; known names: {', '.join(FILES)}")
    return FILES[name]


def _named(name: str) -> NamedModel:
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(MODELS)}")
    return MODELS[name]
