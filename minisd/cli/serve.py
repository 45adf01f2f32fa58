"""`minisd serve`: AUTOMATIC1111's web API and the teaching page (minisd/serve/), on FastAPI + uvicorn.

    minisd serve                                         # the tiny model on http://127.0.0.1:7860
    minisd serve --model v1-5-pruned-emaonly.safetensors --model sd21-base --lora-dir loras/
    minisd serve --host 0.0.0.0 --api-key "$KEY"         # reachable from other machines: a key is required
    minisd serve --model sd15 --controlnet-dir controlnets/   # sd-webui-controlnet's API (/controlnet/...)

Every --model is listed by /sdapi/v1/sd-models under its name (a file's stem, as A1111 names it); the first one is
loaded, and POST /sdapi/v1/options {"sd_model_checkpoint": NAME} switches between them.
"""
import os

from pathlib import Path

from .. import download, hub

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_serve(p):
    p.add_argument("--model", action="append", default=[],
                   help="checkpoint file, diffusers folder or sd15 | sd21 | sd21-base; repeat to list several (the "
                        "first is loaded); default: the tiny built-in model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine "
                   "only; any other needs --api-key)")
    p.add_argument("--port", type=int, default=7860, help="default %(default)s, A1111's")
    p.add_argument("--api-key", default=os.environ.get("MINISD_API_KEY"),
                   help="require this key (header 'Authorization: Bearer KEY', or Basic auth with KEY as the "
                        "password); default: $MINISD_API_KEY")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu", "mps"))
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    p.add_argument("--lora-dir", default=None, metavar="DIR", help="the LoRAs a prompt's <lora:NAME:SCALE> may name")
    p.add_argument("--embeddings-dir", default=None, metavar="DIR",
                   help="every textual-inversion file in DIR, each word its file's stem (A1111)")
    p.add_argument("--controlnet-dir", default=None, metavar="DIR",
                   help="the ControlNets (.safetensors, .pth, diffusers folders) that alwayson_scripts.controlnet "
                        "units may name, listed by /controlnet/model_list")
    p.add_argument("--openpose-weights", default=None, metavar="FILE",
                   help="body_pose_model.pth for the openpose module (default: fetched by name)")
    p.add_argument("--no-prepack", action="store_true", help="CPU: plain layers, no oneDNN-prepared ones (the same "
                   "bytes as `minisd generate --no-prepack`)")


def listed_name(model):
    """The name a model is listed and written under (PNG parameters' "Model"), as `minisd generate` names it."""
    if model is None:
        return "minisd-tiny"
    if model in download.MODELS:
        return model
    if hub.parse(model):
        return hub.display_name(model)
    return Path(model).name if Path(model).is_dir() else Path(model).stem


def run_serve(args):
    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as e:
        raise ValueError(f"minisd serve needs FastAPI and uvicorn ({e.name} is missing): "
                         f"pip install -e \".[serve]\"") from None
    if args.host not in LOOPBACK and not args.api_key:
        raise ValueError(f"--host {args.host} makes the server reachable from other machines: give --api-key KEY "
                         f"(or set MINISD_API_KEY)")
    for folder, flag in ((args.lora_dir, "--lora-dir"), (args.embeddings_dir, "--embeddings-dir"),
                         (args.controlnet_dir, "--controlnet-dir")):
        if folder is not None and not os.path.isdir(folder):
            raise FileNotFoundError(f"{flag} {folder}: no such folder")
    models = {}
    for model in args.model or [None]:
        name = listed_name(model)
        if name in models:
            raise ValueError(f"--model: two models named {name!r}")
        models[name] = model
    app = create_app(models, args.device, args.dtype, prepack=not args.no_prepack, lora_dir=args.lora_dir,
                     embeddings_dir=args.embeddings_dir, api_key=args.api_key, controlnet_dir=args.controlnet_dir,
                     openpose_weights=args.openpose_weights)
    print(f"minisd serve: {next(iter(models))} on http://{args.host}:{args.port}/ (A1111 API at /sdapi/v1)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
