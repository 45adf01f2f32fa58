"""`minisd caption DIR`: a caption for every picture in DIR and its subfolders, written beside it.

Each image NAME.EXT gets NAME.txt (or NAME + --caption-extension) holding its caption, with --prefix in front
(e.g. a DreamBooth token: "sks dog" + " " + "a dog on a beach"); with --metadata each folder gets one
metadata.jsonl instead (diffusers' ImageFolder rows {"file_name", "text"}), which `minisd train` reads too.
An image that already has its caption file (or metadata row) is skipped unless --overwrite. Files are written
atomically (a temporary file in the same folder, then a rename); the images are only read. Every image to
caption is decoded before the model loads, so a bad file is a one-line error before minutes of work.
"""
import json
import os
from pathlib import Path

from tqdm import tqdm

from weights_convert.io import temp_file_beside

from ..caption import load, resolve
from ..download import FOLDERS
from ..devices import pick_device, pick_dtype
from ..train.data import IMAGE_EXTENSIONS, METADATA, load_image, read_metadata


def add_caption(p):
    p.add_argument("dir", help="folder of images (its subfolders too, e.g. kohya's N_prompt folders)")
    p.add_argument("--model", default="blip-large",
                   help="blip-large | blip-base | blip2-opt-2.7b (downloaded once), tiny (the tiny world's "
                        "captioner), or a transformers folder; default blip-large")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width; 1 = greedy")
    p.add_argument("--max-length", type=int, default=75, help="most tokens per caption, prompt included")
    p.add_argument("--min-length", type=int, default=5, help="fewest tokens per caption, prompt included")
    p.add_argument("--prompt", default=None, help='start of every caption, e.g. "a photo of" (conditional '
                                                  "captioning); it stays in the caption")
    p.add_argument("--prefix", default="", help="text put before every caption, separated by a space")
    p.add_argument("--caption-extension", default=".txt", help="caption file extension (.txt, .caption)")
    p.add_argument("--metadata", action="store_true", help="write metadata.jsonl per folder instead of files")
    p.add_argument("--overwrite", action="store_true", help="caption images that already have a caption too")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu", "mps"))
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="auto: fp16 on CUDA, fp32 elsewhere")


def run_caption(args):
    check_args(args)
    folders = image_folders(args.dir)
    if args.model not in FOLDERS:                       # a path or "tiny": checked now; a name downloads later
        resolve(args.model)
    todo, skipped = [], 0
    for folder, names in folders.items():
        done = set(read_metadata(folder)) if args.metadata else \
            {n for n in names if (folder / caption_name(n, args.caption_extension)).exists()}
        for name in names:
            if name in done and not args.overwrite:
                skipped += 1
            else:
                todo.append(folder / name)
    for path in todo:                                   # every image must decode before the model loads
        read_image(path)
    captioned = 0
    if todo:
        device = pick_device(args.device)
        captioner = load(args.model, device, pick_dtype(args.dtype, device))
        prefix = args.prefix.rstrip()
        with tqdm(total=len(todo), unit="image", desc="caption") as bar:
            for start in range(0, len(todo), args.batch_size):
                batch = todo[start:start + args.batch_size]
                texts = captioner.caption([read_image(p) for p in batch], prompt=args.prompt,
                                          num_beams=args.num_beams, min_length=args.min_length,
                                          max_length=args.max_length)
                texts = [f"{prefix} {t}" if prefix else t for t in texts]
                if args.metadata:
                    write_metadata(batch, texts)
                else:
                    for path, text in zip(batch, texts):
                        write_atomic(path.parent / caption_name(path.name, args.caption_extension), text + "\n")
                captioned += len(batch)
                bar.update(len(batch))
    print(f"captioned {captioned}, skipped {skipped}")


def check_args(args):
    if not (args.caption_extension.startswith(".") and len(args.caption_extension) > 1):
        raise ValueError(f"--caption-extension must start with a dot, e.g. .txt, got {args.caption_extension!r}")
    if args.caption_extension.lower() in IMAGE_EXTENSIONS:
        raise ValueError(f"--caption-extension {args.caption_extension} would overwrite images")
    for flag in ("num_beams", "batch_size", "max_length"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.min_length < 0:
        raise ValueError(f"--min-length must not be negative, got {args.min_length}")


def image_folders(root) -> dict:
    """{folder: sorted image names} for `root` and its subfolders (hidden ones left out)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder" if root.exists() else f"{root} does not exist")
    folders = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        names = sorted(n for n in files if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))
        if names:
            folders[Path(folder)] = names
    if not folders:
        raise ValueError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) in {root} or its subfolders")
    return folders


def caption_name(image_name, extension):
    return os.path.splitext(image_name)[0] + extension


def read_image(path):
    try:
        return load_image(path)
    except Exception as e:                   # PIL raises OSError, SyntaxError, ValueError... for bad files
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path} is not a readable image ({reason})") from None


def write_metadata(paths, texts):
    """Add or replace the rows of `paths` in their folders' metadata.jsonl, keeping the other rows in order."""
    by_folder = {}
    for path, text in zip(paths, texts):
        by_folder.setdefault(path.parent, {})[path.name] = text
    for folder, new in by_folder.items():
        rows = read_metadata(folder) | new
        write_atomic(folder / METADATA, "".join(json.dumps({"file_name": name, "text": text}, ensure_ascii=False)
                                                + "\n" for name, text in rows.items()))


def write_atomic(path, text):
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
