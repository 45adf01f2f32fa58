"""One model, one job at a time: a FIFO queue in front of one worker thread that owns the Pipeline.

Every request that touches the model (a generation, a model switch, an attention map) becomes a `Job` and waits
its turn, so the model never runs two things at once and requests are answered in the order they came. The HTTP
side never blocks a thread while it waits: `Worker.run` resolves an asyncio future from the worker thread.

Per step, the worker's callback records the progress (/sdapi/v1/progress reads it), renders a preview only when
somebody asked for one (a /progress poll, or the page's stream), and stops the job after the step if /interrupt
was called (`Interrupted` carries that step's x0 estimate out of the sampler).
"""
import asyncio
import queue
import threading
import time

import torch


class Interrupted(Exception):
    """Raised by the step callback after the step during which /interrupt was called."""

    def __init__(self, denoised):
        super().__init__("interrupted")
        self.denoised = denoised        # (B, 4, h, w): the x0 estimate of the last step run


class QueueFull(Exception):
    pass


# SD 1.x latents -> RGB in [-1, 1], one 4x3 linear map: A1111's "Approx cheap" live preview (fit by Keturn, 2022).
# It costs nothing next to a VAE decode, which is what a big model's per-step preview needs.
LATENT_RGB = torch.tensor([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173],
                           [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]])


def preview(pipe, denoised):
    """The picture of an x0 estimate (B, 4, h, w): the VAE decode for the tiny model (it is as cheap as a step),
    the linear latent -> RGB projection for big ones (h x w pixels, scaled up by the browser)."""
    from ..images import to_pil
    if pipe.model.config.name == "minisd-tiny":
        return to_pil(pipe.decode(denoised))
    rgb = torch.einsum("bchw,cr->brhw", denoised.float().cpu(), LATENT_RGB)
    return to_pil(rgb)


class Job:
    """What to run on the model: work(pipe, callback) -> result, on the worker thread. steps: the sampling steps
    it will run (for /progress); on_step(i, sigma, image): called with each step's preview (the page's stream)."""

    def __init__(self, work, steps=0, on_step=None, name="job"):
        self.work, self.steps, self.on_step, self.name = work, steps, on_step, name
        self.step = 0
        self.interrupted = False
        self.preview = None             # the latest rendered preview (PIL), for /progress
        self.started = None
        self._done = None               # (loop, future) of the request waiting for it

    def finish(self, result=None, error=None):
        loop, future = self._done

        def resolve():
            if not future.done():
                future.set_exception(error) if error is not None else future.set_result(result)
        loop.call_soon_threadsafe(resolve)


class Worker:
    """The thread that owns the Pipeline. load(name) -> Pipeline switches models (a job like any other)."""

    def __init__(self, pipe, load, max_queued=256):
        self.pipe = pipe
        self.model_name = pipe.name     # kept while a switch has no pipeline loaded
        self.load = load
        self.jobs = queue.Queue(maxsize=max_queued)
        self.current = None
        self.want_preview = False       # a /progress poll asked for current_image: render it at the next step
        self.thread = threading.Thread(target=self._loop, name="minisd-worker", daemon=True)
        self.thread.start()

    async def run(self, job):
        """Queue the job and wait for its result (its exception is raised here)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        job._done = (loop, future)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the queue is full ({self.jobs.maxsize} jobs waiting); try again later") from None
        return await future

    def stop(self):
        self.jobs.put(None)

    def _loop(self):
        while (job := self.jobs.get()) is not None:
            self.current, job.started = job, time.time()
            result = error = None
            try:
                result = job.work(self.pipe, self._callback(job))
            except BaseException as e:      # reported to the waiting request; the worker keeps serving
                error = e
            # idle (for /progress) before the request hears of its result
            self.current = None
            job.finish(result, error)

    def _callback(self, job):
        def callback(i, x, denoised, sigma):
            job.step += 1                   # counted over the job's runs (n_iter, img2img's one run per seed)
            if job.on_step is not None or self.want_preview:
                self.want_preview = False
                job.preview = preview(self.pipe, denoised[:1])[0]
                if job.on_step is not None:
                    job.on_step(i, float(sigma), job.preview)
            if job.interrupted:
                raise Interrupted(denoised)
        return callback

    def switch(self, name):
        """A job that replaces the model with `name`'s (the old one is dropped first: one model in memory)."""
        def work(pipe, callback):
            self.pipe = None
            try:
                self.pipe = self.load(name)
            except BaseException:
                self.pipe = self.load(pipe.name)     # the old model back: the server keeps serving
                raise
            self.model_name = name
            return name
        return Job(work, name=f"load {name}")

    def interrupt(self):
        job = self.current
        if job is not None:
            job.interrupted = True

    def progress(self, skip_current_image=False):
        """A1111's ProgressResponse: progress in [0, 1], eta_relative (seconds left, estimated), state, and
        current_image (the latest x0 preview, PIL or None)."""
        job = self.current
        if not skip_current_image:
            self.want_preview = True
        waiting = self.jobs.qsize()
        if job is None or not job.steps:
            state = dict(skipped=False, interrupted=False, stopping_generation=False, job="", job_count=waiting,
                         job_timestamp="0", job_no=0, sampling_step=0, sampling_steps=0)
            return dict(progress=0.0, eta_relative=0.0, state=state, current_image=None, textinfo=None)
        progress = min(job.step / job.steps, 1.0)
        elapsed = time.time() - job.started
        eta = elapsed / progress - elapsed if progress > 0 else 0.0
        state = dict(skipped=False, interrupted=job.interrupted, stopping_generation=False, job=job.name,
                     job_count=waiting + 1, job_timestamp=time.strftime("%Y%m%d%H%M%S",
                                                                       time.localtime(job.started)),
                     job_no=0, sampling_step=job.step, sampling_steps=job.steps)
        return dict(progress=progress, eta_relative=eta, state=state,
                    current_image=None if skip_current_image else job.preview, textinfo=None)
