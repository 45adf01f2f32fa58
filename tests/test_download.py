"""Fetching named models and the FID Inception weights, against a small hub imitation on 127.0.0.1 (no real host
is ever contacted).

The imitation behaves like huggingface.co does for a Git LFS file: a HEAD or GET on
/{repo}/resolve/main/{file} answers 302 to the storage CDN with the file's SHA-256 in `X-Linked-Etag`, and
the CDN URL serves the bytes, honouring `Range: bytes=N-` with 206 and a Content-Range header.
"""
import hashlib
import http.server
import json
import re
import socket
import threading
import urllib.error

import pytest

from minisd import download as dl
from minisd import cli
from minisd.metrics import inception
from minisd.tiny import shapes

TIMEOUT = 5   # seconds, for every socket on both sides: a hung test fails instead of hanging


class Hub:
    """A threaded HTTP server with a few scripted faults; records (method, path, Range) of every request."""

    def __init__(self, files, etags=None, cut_first_at=None, ignore_range=False, moved=None, api=None):
        self.files = files                              # resolve path -> bytes
        self.etags = etags or {p: hashlib.sha256(b).hexdigest() for p, b in files.items()}
        self.cut_first_at = cut_first_at                # first CDN GET sends only this many bytes, then closes
        self.ignore_range = ignore_range                # answer 200 with the whole file to a Range request
        self.moved = moved or {}                        # old resolve path -> new one (a renamed repository)
        self.api = api or {}                            # GET path -> JSON answered as it is (the model API)
        self.requests = []
        self.authorization = []                         # (path, Authorization header or None) of every request
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = TIMEOUT

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.requests.append(("HEAD", self.path, self.headers.get("Range")))
                hub.authorization.append((self.path, self.headers.get("Authorization")))
                self.resolve()

            def do_GET(self):
                hub.requests.append(("GET", self.path, self.headers.get("Range")))
                hub.authorization.append((self.path, self.headers.get("Authorization")))
                if self.path in hub.api:
                    body = json.dumps(hub.api[self.path]).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif self.path.startswith("/cdn"):
                    self.serve_bytes(self.path.removeprefix("/cdn"))
                else:
                    self.resolve()

            def resolve(self):
                if self.path in hub.moved:
                    self.send_response(307)
                    self.send_header("Location", hub.moved[self.path])
                elif self.path in hub.files:
                    self.send_response(302)
                    self.send_header("Location", f"{hub.url}/cdn{self.path}")
                    self.send_header("X-Linked-Etag", f'"{hub.etags[self.path]}"')
                    self.send_header("X-Linked-Size", str(len(hub.files[self.path])))
                    self.send_header("ETag", '"a-git-blob-id-not-a-sha256"')
                else:
                    self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def serve_bytes(self, path):
                data = hub.files[path]
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                start = int(match.group(1)) if match and not hub.ignore_range else 0
                if start >= len(data) and match and not hub.ignore_range:
                    self.send_response(416)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = data[start:]
                self.send_response(206 if start or (match and not hub.ignore_range) else 200)
                if match and not hub.ignore_range:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if hub.cut_first_at is not None:
                    body, hub.cut_first_at = body[:hub.cut_first_at], None
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)   # the connection drops mid-body
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(TIMEOUT)

    def cdn_ranges(self):
        return [r for method, path, r in self.requests if method == "GET" and path.startswith("/cdn")]


DATA = bytes(range(256)) * 1200          # 300 KiB, several read chunks' worth of distinct bytes
SD21 = "/stabilityai/stable-diffusion-2-1/resolve/main/v2-1_768-ema-pruned.safetensors"
SD15 = "/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/v1-5-pruned-emaonly.safetensors"


def fetch(hub_url, tmp_path, name="sd21", **kwargs):
    return dl.fetch_model(name, cache=tmp_path, endpoint=hub_url, progress=False, timeout=TIMEOUT,
                          retry_wait=0, **kwargs)


def closed_port_url():
    with socket.socket() as s:             # a port that was free a moment ago and has nobody listening
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_downloads_checks_and_renames(tmp_path):
    with Hub({SD21: DATA}) as hub:
        path = fetch(hub.url, tmp_path)
    assert path == tmp_path / "v2-1_768-ema-pruned.safetensors"
    assert path.read_bytes() == DATA
    assert [p.name for p in tmp_path.iterdir()] == [path.name]          # no .part left behind
    assert hub.requests[0] == ("HEAD", SD21, None)                      # the checksum came from the hub
    assert hub.cdn_ranges() == ["bytes=0-"]                             # the redirect kept the Range header


def test_resumes_after_a_cut_connection(tmp_path, capfd):
    with Hub({SD21: DATA}, cut_first_at=100_000) as hub:
        path = fetch(hub.url, tmp_path)
    assert path.read_bytes() == DATA
    assert hub.cdn_ranges() == ["bytes=0-", "bytes=100000-"]            # the second request asked for the rest
    assert "resuming" in capfd.readouterr().err


def test_resumes_a_part_file_left_by_an_earlier_run(tmp_path):
    (tmp_path / "v2-1_768-ema-pruned.safetensors.part").write_bytes(DATA[:1234])
    with Hub({SD21: DATA}) as hub:
        path = fetch(hub.url, tmp_path)
    assert path.read_bytes() == DATA
    assert hub.cdn_ranges() == ["bytes=1234-"]


def test_server_that_ignores_range_restarts_the_file(tmp_path):
    (tmp_path / "v2-1_768-ema-pruned.safetensors.part").write_bytes(b"x" * 5000)
    with Hub({SD21: DATA}, ignore_range=True) as hub:
        path = fetch(hub.url, tmp_path)
    assert path.read_bytes() == DATA


def test_checksum_mismatch_is_an_error_and_leaves_no_file(tmp_path):
    with Hub({SD21: DATA}, etags={SD21: hashlib.sha256(b"other bytes").hexdigest()}) as hub:
        with pytest.raises(dl.DownloadError, match="Checksum mismatch.*v2-1_768-ema-pruned.safetensors"):
            fetch(hub.url, tmp_path)
    assert list(tmp_path.iterdir()) == []                                # neither the final name nor a .part


def test_explicit_sha256_wins_over_the_hub(tmp_path):
    with Hub({SD21: DATA}, etags={SD21: "0" * 64}) as hub:
        path = fetch(hub.url, tmp_path, sha256=hashlib.sha256(DATA).hexdigest().upper())
    assert path.read_bytes() == DATA
    assert [m for m, _, _ in hub.requests].count("HEAD") == 0           # the hub was not even asked


def test_pinned_sha256_is_used_for_sd15(tmp_path):
    # The hub imitation reports the served bytes' own hash, but sd15's checksum is pinned: the bytes must fail.
    with Hub({SD15: DATA}) as hub:
        with pytest.raises(dl.DownloadError, match="6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"):
            fetch(hub.url, tmp_path, name="sd15")
    assert list(tmp_path.iterdir()) == []


def test_http_404_names_the_model_and_url(tmp_path):
    with Hub({}) as hub:
        with pytest.raises(dl.DownloadError) as error:
            fetch(hub.url, tmp_path)
    message = str(error.value)
    assert "'sd21'" in message and "404" in message and hub.url + SD21 in message
    assert str(tmp_path / "v2-1_768-ema-pruned.safetensors") in message


def test_offline_says_what_to_download_and_where_to_put_it(tmp_path):
    url = closed_port_url()
    with pytest.raises(dl.DownloadError) as error:
        fetch(url, tmp_path)
    message = str(error.value)
    assert "Could not reach" in message and url + SD21 in message
    assert str(tmp_path / "v2-1_768-ema-pruned.safetensors") in message
    assert list(tmp_path.iterdir()) == []


def test_a_dns_failure_counts_as_offline():
    # Classified without a real lookup: urllib wraps the resolver's error in URLError.
    assert dl._is_offline(urllib.error.URLError(socket.gaierror(-2, "Name or service not known")))
    assert dl._is_offline(urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")))
    assert not dl._is_offline(ConnectionResetError(104, "reset mid-body"))   # retried, not offline


def test_a_cached_file_is_used_without_the_network(tmp_path):
    (tmp_path / "v2-1_768-ema-pruned.safetensors").write_bytes(b"already here")
    assert fetch(closed_port_url(), tmp_path).read_bytes() == b"already here"


def test_hub_checksum_follows_a_renamed_repository():
    old = "/old-owner/old-repo/resolve/main/v2-1_768-ema-pruned.safetensors"
    with Hub({SD21: DATA}, moved={old: SD21}) as hub:
        assert dl.expected_sha256("sd21", hub.url + old, timeout=TIMEOUT) == hashlib.sha256(DATA).hexdigest()


def test_environment_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("MINISD_CACHE", str(tmp_path / "models"))
    monkeypatch.setenv("MINISD_HF_ENDPOINT", "http://mirror.example/")
    assert dl.cache_dir() == tmp_path / "models"
    assert dl.model_path("sd21-base") == tmp_path / "models" / "v2-1_512-ema-pruned.safetensors"
    assert dl.model_url("sd21-base") == ("http://mirror.example/stabilityai/stable-diffusion-2-1-base"
                                         "/resolve/main/v2-1_512-ema-pruned.safetensors")
    assert dl.model_url("sd15", endpoint="http://other").startswith("http://other/stable-diffusion-v1-5/")
    monkeypatch.delenv("MINISD_CACHE")
    assert str(dl.cache_dir()).endswith(".cache/minisd")


def test_named_models_match_their_configs(monkeypatch):
    monkeypatch.delenv("MINISD_HF_ENDPOINT", raising=False)
    assert {name: (m.config.prediction, m.config.image_size) for name, m in dl.MODELS.items()} == {
        "sd15": ("eps", 512), "sd21": ("v", 768), "sd21-base": ("eps", 512)}
    assert dl.model_url("sd15") == ("https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5"
                                    "/resolve/main/v1-5-pruned-emaonly.safetensors")


def test_unknown_name_and_bad_sha256_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="sd15, sd21, sd21-base"):
        dl.model_url("sd3")
    with pytest.raises(ValueError, match="64 hex"):
        fetch(closed_port_url(), tmp_path, sha256="abc")


# ---- the FID Inception weights: checked against the SHA-256 prefix in their file name (torch.hub's rule) ----------

INCEPTION = "/mseitzer/pytorch-fid/releases/download/fid_weights/" + inception.FILENAME


@pytest.fixture
def inception_hub(tmp_path, monkeypatch):
    """The Inception URL pointed at a hub imitation serving DATA (whose SHA-256 does not start with 6726825d), and
    no weights in the places load_inception looks first."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("MINISD_CACHE", str(tmp_path / "cache"))
    with Hub({INCEPTION: DATA}) as hub:
        monkeypatch.setattr(inception, "URL", hub.url + INCEPTION)
        yield hub


def test_the_pinned_prefix_is_the_one_in_the_inception_file_name():
    assert inception.FILENAME.removesuffix(".pth").rsplit("-", 1)[1] == inception.SHA256_PREFIX == "6726825d"


def test_a_hash_prefix_accepts_a_file_whose_sha256_starts_with_it_and_deletes_one_that_does_not(tmp_path):
    prefix = hashlib.sha256(DATA).hexdigest()[:8]
    with Hub({SD21: DATA}) as hub:
        good = dl.download(hub.url + SD21, tmp_path / "good", progress=False, timeout=TIMEOUT, hash_prefix=prefix)
        with pytest.raises(dl.ChecksumError, match=f"expected SHA-256 6726825d[.]{{3}}, got {prefix}"):
            dl.download(hub.url + SD21, tmp_path / "bad", progress=False, timeout=TIMEOUT, hash_prefix="6726825d")
    assert good.read_bytes() == DATA
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good"]           # neither "bad" nor "bad.part"


def test_inception_weights_whose_sha256_does_not_match_their_name_are_refused_in_one_line(
        inception_hub, tmp_path, capsys):
    shapes.write_image_folder(tmp_path / "a", 2, seed=1)
    shapes.write_image_folder(tmp_path / "b", 2, seed=2)
    assert cli.main(["fid", str(tmp_path / "a"), str(tmp_path / "b")]) == 2     # fetches the weights, refuses them
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("minisd: error: could not download the Inception weights: Checksum mismatch for "
                            f"{inception.URL}: expected SHA-256 6726825d..., got {hashlib.sha256(DATA).hexdigest()}")
    assert "--inception-weights FILE" in error
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []   # nothing kept


def test_inception_weights_whose_sha256_starts_with_the_prefix_are_accepted(inception_hub, tmp_path, monkeypatch):
    monkeypatch.setattr(inception, "SHA256_PREFIX", hashlib.sha256(DATA).hexdigest()[:8])   # as if DATA were it
    path = inception._fetch(tmp_path / "cache" / inception.FILENAME, [], download=True)
    assert path == tmp_path / "cache" / inception.FILENAME and path.read_bytes() == DATA
    assert [method for method, _, _ in inception_hub.requests] == ["GET", "GET"]      # the URL, then the redirect
