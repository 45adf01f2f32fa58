"""A ControlNet's training data: images, each with its conditioning image (edges, a pose ...) and a caption, in
one plain folder, in either of two layouts:

- `NAME.png` beside `NAME.cond.png` (any image extension for either), captioned as for fine-tuning (data.py):
  `NAME.txt` or a `metadata.jsonl` line {"file_name": "NAME.png", "text": ...};
- a `metadata.jsonl` with the columns of diffusers' train_controlnet.py datasets (fill50k): one line per example,
  {"image": "a.png", "conditioning_image": "a_edges.png", "text": ...}, paths relative to the folder ("file_name"
  is read as "image", the name diffusers' ImageFolder gives it).

Every image and conditioning image is decoded once here, so a bad file is an error before any training. A
conditioning image of another size than its image is resized to the image's size when read (data.Example.
condition_image), then cropped and flipped as the image is (batches.take).
"""
import dataclasses
import json
import os

from .data import (METADATA, Example, check_caption_extension, check_resolution, is_image, is_kohya_layout,
                   load_image, read_text, _read_folder)

COND = ".cond"                       # NAME.cond.png is NAME.png's conditioning image


def find_pairs(folder, resolution, log=print, caption_extension=".txt", skip_bad_images=False):
    """The examples of a ControlNet data folder (module docstring), each with its `condition` file."""
    check_resolution(resolution)
    check_caption_extension(caption_extension)
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} is not a folder" if os.path.exists(folder) else f"{folder} does not exist")
    if is_kohya_layout(folder):
        raise ValueError(f"{folder}: a ControlNet's data is one plain folder (NAME.png, NAME.cond.png, NAME.txt), "
                         "not kohya's N_prompt subfolders")
    rows = _diffusers_rows(folder)
    if rows is not None:
        return [_row_example(folder, n, row) for n, row in rows]
    names = sorted(os.listdir(folder))
    conds = {os.path.splitext(n)[0][:-len(COND)]: n for n in names
             if is_image(n) and os.path.splitext(n)[0].endswith(COND)}
    images = [n for n in names if is_image(n) and n not in conds.values()]
    if not images:
        raise ValueError(f"no images in {folder} (a ControlNet's data: NAME.png with NAME.cond.png and NAME.txt)")
    stems = {os.path.splitext(n)[0] for n in images}
    missing = [n for n in images if os.path.splitext(n)[0] not in conds]
    if missing:
        stem = os.path.splitext(missing[0])[0]
        raise ValueError(f"{len(missing)} images in {folder} have no conditioning image (first: {missing[0]}, "
                         f"which needs {stem}{COND}.png beside it)")
    orphans = sorted(n for stem, n in conds.items() if stem not in stems)
    if orphans:
        raise ValueError(f"{os.path.join(folder, orphans[0])} is a conditioning image without its image "
                         f"({len(orphans)} such)")
    bad = []
    examples = _read_folder(folder, [n for n in names if n not in conds.values()], None, 1, caption_extension, bad,
                            skip_bad_images, log)
    if bad:
        log(f"skipped {len(bad)} images that cannot be decoded (--skip-bad-images; first: {bad[0]})")
        if not examples:
            raise ValueError(f"no readable images in {folder}: all {len(bad)} cannot be decoded")
    out = []
    for e in examples:
        condition = os.path.join(folder, conds[os.path.splitext(os.path.basename(e.path))[0]])
        _check_image(condition, "conditioning image")
        out.append(dataclasses.replace(e, condition=condition))
    return out


def _diffusers_rows(folder):
    """[(line number, row)] of a metadata.jsonl with conditioning_image columns, or None (no such file, or
    fine-tuning's captions-only form, which data.py reads)."""
    path = os.path.join(folder, METADATA)
    if not os.path.exists(path):
        return None
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except ValueError:
                raise ValueError(f"{path} line {n} is not JSON") from None
    if not any(isinstance(r, dict) and "conditioning_image" in r for _, r in rows):
        return None
    if not rows:
        raise ValueError(f"{path} is empty")
    return rows


def _row_example(folder, n, row):
    where = f"{os.path.join(folder, METADATA)} line {n}"
    image = row.get("image", row.get("file_name")) if isinstance(row, dict) else None
    if not (isinstance(image, str) and isinstance(row.get("conditioning_image"), str)
            and isinstance(row.get("text"), str)):
        raise ValueError(f"{where} is not {{\"image\": ..., \"conditioning_image\": ..., \"text\": ...}}")
    path, condition = os.path.join(folder, image), os.path.join(folder, row["conditioning_image"])
    size = _check_image(path, "image", where)
    _check_image(condition, "conditioning image", where)
    return Example(path, row["text"].strip(), size=size, condition=condition)


def _check_image(path, what, where=None):
    """The (width, height) of the image at `path`, or a one-line error naming it."""
    try:
        return load_image(path).size
    except Exception as e:                   # PIL raises OSError, SyntaxError, ValueError... for bad files
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}" + (f" ({where})" if where else "") + f" is not a readable {what} "
                         f"({reason})") from None
