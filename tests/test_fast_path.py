"""The fast path: a sampling loop that never waits for the device, torch.compile and CUDA-graph replay of the U-Net.

On a GPU, reading a tensor's value on the host (`.item()`, `float(t)`, `if t:`) or copying a tensor from ordinary
host memory to the device makes Python wait until the GPU has finished everything queued before; inside the
sampling loop that leaves the GPU idle while Python prepares each step. The CPU tests below forbid every
tensor-to-Python conversion while the sampler runs; the CUDA tests (skipped without a GPU) run the loop under
torch.cuda's sync debug mode, which also catches the copies. Speed itself is measured by bench/, not here.
"""
import contextlib

import pytest
import torch

from checkpoints import SMALL_SD1
from minisd import diffusion, samplers, schedules
from minisd.model import StableDiffusion, save_model
from minisd.pipeline import Pipeline

PROMPT = "a red circle on a blue background"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A small random model in minisd's own layout (no reference library needed: these tests also run on GPU
    machines that have only torch)."""
    path = tmp_path_factory.mktemp("small-sd1") / "model.safetensors"
    torch.manual_seed(3)
    save_model(StableDiffusion(SMALL_SD1), path)
    return str(path)


@pytest.fixture(scope="module")
def pipe(ckpt):
    return Pipeline.load(ckpt, device="cpu", dtype="fp32", log=lambda *_: None)


class HostRead(RuntimeError):
    pass


@contextlib.contextmanager
def no_host_reads():
    """Every way Python reads a tensor's value raises HostRead inside the block."""
    def forbidden(self, *args, **kwargs):
        raise HostRead("a tensor value was read on the host inside the sampling loop")
    names = ("item", "tolist", "numpy", "__float__", "__int__", "__index__", "__bool__")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    try:
        for name in names:
            setattr(torch.Tensor, name, forbidden)
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def guarded_sample(monkeypatch):
    """Make the pipeline's call to samplers.sample run with no_host_reads()."""
    original = samplers.sample

    def sample(*args, **kwargs):
        with no_host_reads():
            return original(*args, **kwargs)
    monkeypatch.setattr(samplers, "sample", sample)


def test_the_guard_catches_a_host_read():
    x = torch.ones(2)
    with pytest.raises(HostRead):
        with no_host_reads():
            x.sum().item()
    with pytest.raises(HostRead):
        with no_host_reads():
            bool(x.sum() > 0)
    assert x.sum().item() == 2.0                    # and everything is restored after the block


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m", "heun", "ddim", "lms"])
def test_sampling_loop_reads_no_tensor_value_on_the_host(pipe, monkeypatch, sampler):
    guarded_sample(monkeypatch)
    result = pipe.generate(PROMPT, "blurry", steps=3, cfg=7.5, sampler=sampler, seed=1, width=32, height=32)
    assert result.latents.isfinite().all()


def test_precomputed_timesteps_give_the_same_denoiser():
    """make_denoiser(sigmas=...) only moves work out of the loop: the same numbers, bit for bit."""
    calls = []

    def model(x, t, context):
        calls.append(t)
        return torch.sin(x * 1.7 + t[:, None, None, None] / 100)

    alphas_cumprod = diffusion.alphas_cumprod_from_betas(diffusion.scaled_linear_betas())
    sigmas = schedules.get_sigmas("karras", 5, diffusion.sigmas_from_alphas_cumprod(alphas_cumprod))
    plain = diffusion.make_denoiser(model, alphas_cumprod, "eps")
    tabled = diffusion.make_denoiser(model, alphas_cumprod, "eps", sigmas=sigmas)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for sigma in sigmas[:-1].tolist() + [0.5]:     # 0.5 is not in the table: computed on the fly
        assert torch.equal(tabled(x, sigma), plain(x, sigma))
    assert not torch.equal(plain(x, sigmas[0].item()), plain(x, sigmas[1].item()))   # the check can fail


def test_compiled_unet_gives_the_same_image(ckpt, pipe):
    torch._dynamo.reset()
    fast = Pipeline.load(ckpt, device="cpu", dtype="fp32", log=lambda *_: None, compile=True)
    kw = dict(steps=2, cfg=7.5, sampler="euler", seed=2, width=32, height=32)
    eager = pipe.generate(PROMPT, **kw).latents
    compiled = fast.generate(PROMPT, **kw).latents
    # Inductor fuses and reorders float32 reductions: rounding-level differences only
    assert (compiled - eager).abs().max() <= 1e-4 * eager.abs().max()


def test_cuda_graph_needs_cuda(ckpt):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        Pipeline.load(ckpt, device="cpu", dtype="fp32", log=lambda *_: None, cuda_graph=True)


@cuda
@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m"])
def test_cuda_sampling_loop_never_synchronises(ckpt, monkeypatch, sampler):
    gpu = Pipeline.load(ckpt, device="cuda", dtype="fp16", log=lambda *_: None)
    original = samplers.sample

    def sample(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")      # any synchronising call raises
        try:
            return original(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    monkeypatch.setattr(samplers, "sample", sample)
    gpu.generate(PROMPT, "blurry", steps=3, sampler=sampler, seed=1, width=32, height=32)


@cuda
def test_cuda_graph_replay_gives_the_same_image(ckpt):
    kw = dict(steps=3, cfg=7.5, sampler="dpmpp_2m", seed=4, width=32, height=32)
    eager = Pipeline.load(ckpt, device="cuda", dtype="fp16", log=lambda *_: None).generate(PROMPT, **kw).latents
    graphed = Pipeline.load(ckpt, device="cuda", dtype="fp16", log=lambda *_: None, cuda_graph=True)
    first = graphed.generate(PROMPT, **kw).latents       # captures
    again = graphed.generate(PROMPT, **kw).latents       # replays the captured graph
    assert torch.equal(first, again)
    assert (first.float() - eager.float()).abs().max() <= 1e-2 * eager.float().abs().max()
