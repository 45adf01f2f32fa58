"""The HTTP server: A1111's /sdapi/v1 routes, the page's two routes (/minisd/v1/...), the page itself, and the
rules every request passes first.

    app = create_app({"minisd-tiny": None})            # listed name -> what Pipeline.load takes (None: tiny)
    uvicorn.run(app, host="127.0.0.1", port=7860)      # what `minisd serve` does

Safety, in one place each:
  - the API key (`api_key`): every /sdapi and /minisd route needs `Authorization: Bearer KEY`, or HTTP Basic auth
    with KEY as the password (what A1111's --api-auth clients such as webuiapi send); compared in constant time;
    missing or wrong: 401. The page itself (/) holds nothing secret and is served to anyone who can reach it.
  - no request field names a server path: models by their listed name, LoRAs by the names in --lora-dir
    (a1111.settings), embeddings are loaded at start only;
  - limits and malformed requests: a 422 with one line in "detail" (a1111.py); a failure inside a job is a 422
    (a ValueError: the request was wrong) or a 500 with one line, and the worker keeps serving.
"""
import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import os
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .. import lora, samplers
from ..pipeline import Pipeline
from . import a1111, controlnet_units, teach
from .jobs import Job, QueueFull, Worker

PAGE = Path(__file__).parent / "page"
PAGE_FILES = {"/": "index.html", "/page.js": "page.js"}     # everything the page needs; no CDN


class UserError(Exception):
    """A request the server cannot serve: answered with `status` and one line."""

    def __init__(self, message, status=422):
        super().__init__(message)
        self.status = status


def _one_line(message):
    return " ".join(str(message).split())


def _authorized(header, api_key):
    """`Authorization: Bearer KEY`, or Basic with KEY as the password, compared in constant time."""
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.encode("utf-8"), api_key.encode("utf-8"))


def lora_names(folder):
    """The LoRA files of --lora-dir by name (their stems), as A1111's /sdapi/v1/loras lists them."""
    if folder is None:
        return {}
    return {os.path.splitext(f)[0]: os.path.join(root, f) for root, _, files in sorted(os.walk(folder))
            for f in sorted(files) if f.endswith(lora.EXTENSIONS)}


def create_app(models, device="auto", dtype="auto", prepack=True, lora_dir=None, embeddings_dir=None,
               api_key=None, controlnet_dir=None, openpose_weights=None, log=print):
    """models: {listed name: checkpoint path, named model or None (tiny)}; the first one is loaded.
    controlnet_dir: the ControlNets a request may name; openpose_weights: body_pose_model.pth for the openpose
    module (None: fetched by name, as `minisd generate` does)."""

    def load(name):
        pipe = Pipeline.load(models[name], device=device, dtype=dtype, prepack=prepack, log=log)
        pipe.name = name
        pipe.load_embeddings(folder=embeddings_dir)
        pipe.lora_dir = lora_dir
        return pipe

    worker = Worker(load(next(iter(models))), load)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.stop()                               # the server stopped: the worker thread ends too

    app = FastAPI(title="minisd", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.worker = worker

    # -- the rules every request passes -------------------------------------------------------------------

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path not in PAGE_FILES and \
                not _authorized(request.headers.get("authorization"), api_key):
            return JSONResponse({"detail": "missing or wrong API key"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def malformed(request, exc):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid" or tuple(first.get("loc", ())) == ("body",):
            message = f"malformed body: expected a JSON object ({first.get('msg')})"
        else:
            message = f"{where}: {first.get('msg')}" if where else first.get("msg")
        return JSONResponse({"detail": _one_line(message)}, status_code=422)

    @app.exception_handler(UserError)
    async def user_error(request, exc):
        return JSONResponse({"detail": _one_line(exc)}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return JSONResponse({"detail": _one_line(exc.detail)}, status_code=exc.status_code)

    async def run(job):
        """The job's result; its errors as one line: a ValueError is the request's fault (422)."""
        try:
            return await worker.run(job)
        except QueueFull as e:
            raise UserError(e, 503) from None
        except ValueError as e:
            raise UserError(e) from None
        except Exception as e:
            log(f"minisd serve: {job.name} failed: {type(e).__name__}: {e}")
            raise UserError(f"{type(e).__name__}: {e}", 500) from None

    def read(request):
        try:
            settings = a1111.settings(request, lora_names(lora_dir))
            only_masked = settings.inpaint is not None and settings.inpaint["only_masked"]
            settings.units = controlnet_units.read_units(request.alwayson_scripts,
                                                         controlnet_units.controlnet_names(controlnet_dir), only_masked)
            return settings
        except ValueError as e:
            raise UserError(e) from None

    def generation(settings, on_step=None):
        """The job that runs `settings`: its ControlNets loaded on the worker, then a1111.generate. Its result:
        (images, infotexts, interrupted, model name, ControlNet's condition images to append)."""
        def work(pipe, callback):
            controls, fields = controlnet_units.load_units(settings.units, pipe, openpose_weights)
            images, infotexts, interrupted = a1111.generate(settings, pipe, callback, controls, fields)
            size = images[0].size if images else None
            return images, infotexts, interrupted, pipe.name, controlnet_units.detected_maps(settings.units, controls,
                                                                                             size)
        return Job(work, sampling_steps(settings), on_step=on_step,
                   name="img2img" if settings.init_image is not None else "txt2img")

    def sampling_steps(read):
        steps = read.kwargs["steps"]
        if read.init_image is not None:
            steps = int(steps * read.strength)
        return steps * len(read.seeds)

    # -- A1111's API --------------------------------------------------------------------------------------

    async def generate(request):
        settings = read(request)
        images, infotexts, interrupted, model, maps = await run(generation(settings))
        return a1111.reply(request, settings, images, infotexts, model, interrupted, maps)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: a1111.Txt2Img):
        return await generate(request)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: a1111.Img2Img):
        return await generate(request)

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        state = worker.progress(skip_current_image)
        image = state["current_image"]
        state["current_image"] = None if image is None else a1111.png_base64(image)
        return state

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip():
        raise UserError("skip is not supported (use /sdapi/v1/interrupt)")

    @app.get("/sdapi/v1/scripts")
    async def scripts():                    # no scripts or extensions (clients such as webuiapi look for them)
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/samplers")
    async def sampler_list():
        return [{"name": name, "aliases": [key], "options": {}} for name, key in samplers.DISPLAY_NAMES.items()]

    @app.get("/sdapi/v1/schedulers")
    async def scheduler_list():
        return [{"name": name, "label": name.capitalize(), "aliases": None, "default_rho": -1,
                 "need_inner_model": False} for name in a1111.SCHEDULERS]

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name,
                 "config": None} for name in models]

    @app.get("/sdapi/v1/options")
    async def get_options():
        return {"sd_model_checkpoint": worker.model_name, "samples_format": "png"}

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        try:
            options = await request.json()
        except json.JSONDecodeError as e:
            raise UserError(f"malformed JSON body: {e}") from None
        if not isinstance(options, dict):
            raise UserError("the body must be a JSON object of options")
        unknown = sorted(set(options) - {"sd_model_checkpoint"})
        if unknown:
            raise UserError(f"option {unknown[0]!r} is not supported; settable: sd_model_checkpoint")
        if "sd_model_checkpoint" in options:
            name = options["sd_model_checkpoint"]
            if name not in models:
                raise UserError(f"sd_model_checkpoint: no model named {name!r} (GET /sdapi/v1/sd-models lists "
                                f"them: {', '.join(models)})")
            if name != worker.model_name:
                await run(worker.switch(name))
        return None

    @app.get("/sdapi/v1/loras")
    async def loras():
        return [{"name": name, "alias": name, "path": name, "metadata": {}} for name in lora_names(lora_dir)]

    @app.get("/sdapi/v1/embeddings")
    async def embeddings():
        pipe = worker.pipe                              # None while a switch loads the next model
        loaded = pipe.embeddings.vectors if pipe is not None else {}
        return {"loaded": {word: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                  "shape": v.shape[-1], "vectors": v.shape[0]} for word, v in loaded.items()},
                "skipped": {}}

    # -- sd-webui-controlnet's API: its units come in txt2img / img2img's alwayson_scripts (controlnet_units.py)

    @app.get("/controlnet/version")
    async def controlnet_version():
        return {"version": controlnet_units.API_VERSION}

    @app.get("/controlnet/model_list")
    async def controlnet_models(update: bool = True):      # the folder is read on every call: always up to date
        return {"model_list": controlnet_units.model_list(controlnet_dir)}

    @app.get("/controlnet/module_list")
    async def controlnet_modules(alias_names: bool = False):       # the names are the aliases
        return controlnet_units.module_list()

    @app.get("/controlnet/settings")
    async def controlnet_settings():
        return {"control_net_unit_count": controlnet_units.MAX_UNITS}

    # -- the page's routes ---------------------------------------------------------------------------------

    @app.post("/minisd/v1/txt2img/stream")
    async def txt2img_stream(request: a1111.Txt2Img):
        """txt2img as newline-delimited JSON: one line per step ({"step", "steps", "sigma", "preview"}), then
        the reply ({"images", "info", "parameters"}), or {"detail"} if it failed."""
        settings = read(request)
        loop, lines = asyncio.get_running_loop(), asyncio.Queue()

        def on_step(i, sigma, image):
            line = {"step": i + 1, "steps": job.steps, "sigma": sigma, "preview": a1111.png_base64(image)}
            loop.call_soon_threadsafe(lines.put_nowait, line)
        job = generation(settings, on_step)

        async def finish():
            try:
                images, infotexts, interrupted, model, maps = await run(job)
                body = a1111.reply(request, settings, images, infotexts, model, interrupted, maps)
                await lines.put(body | {"infotexts": infotexts})
            except UserError as e:
                await lines.put({"detail": _one_line(e)})
            await lines.put(None)

        async def stream():
            task = asyncio.create_task(finish())
            while (line := await lines.get()) is not None:
                yield json.dumps(line) + "\n"
            await task
        return StreamingResponse(stream(), media_type="application/x-ndjson")

    @app.post("/minisd/v1/attention")
    async def attention(request: a1111.Txt2Img):
        """One image and the cross-attention map of each prompt token: {"image", "parameters", "words":
        [{"text", "map": rows of floats}]}, each map over the latent grid (height/8 x width/8)."""
        settings = read(request)
        if len(settings.seeds) != 1:
            raise UserError("the attention map is for one image: batch_size and n_iter must be 1")
        if settings.units:
            raise UserError("the attention map takes no ControlNet: leave out alwayson_scripts")
        settings.kwargs["emphasis"] = False                 # the tokens shown are the prompt's own
        job = Job(lambda pipe, callback: teach.attention_maps(settings, pipe, callback), sampling_steps(settings),
                  name="attention")
        image, parameters, words = await run(job)
        return {"image": a1111.png_base64(image, parameters), "parameters": parameters,
                "words": [{"text": text, "map": m.tolist()} for text, m in words]}

    # -- the page ------------------------------------------------------------------------------------------

    for route, name in PAGE_FILES.items():
        app.add_api_route(route, lambda name=name: FileResponse(PAGE / name), methods=["GET"],
                          include_in_schema=False)
    return app
