"""Aspect-ratio buckets (--enable-bucket), as kohya-ss/sd-scripts computes them (NovelAI's idea, "aspect ratio
bucketing", 2022): instead of centre-cropping every photo to a square, which cuts off heads and feet, each image
trains at the size of its bucket, a width x height of about the same area as resolution^2 whose aspect ratio is
nearest its own, and every micro-batch is drawn from one bucket (batches.py), so its images stack.

The bucket list (kohya's library/model_util.make_bucket_resolutions), for max area A = resolution^2, bounds
min_size..max_size and step d (--min-bucket-reso 256, --max-bucket-reso 1024, --bucket-reso-steps 64):

    the square  (s, s), s = int(sqrt(A) // d) * d
    for w = min_size, min_size + d, ... <= max_size:
        h = min(max_size, (A // w) // d * d);  if h >= min_size: (w, h) and (h, w)
    sorted

An image of size (W, H) (kohya's BucketManager.select_bucket):

- its own size if that is in the list, else the bucket whose aspect ratio w / h is nearest W / H (the first of the
  sorted list on a tie, numpy's argmin);
- resized to cover the bucket: scale = bucket h / H if the image is wider than the bucket, else bucket w / W, to
  (int(W * scale + .5), int(H * scale + .5)), then the excess cropped: centred (kohya's (excess) // 2) with
  --center-crop, else at a random offset (kohya's randint(0, excess), drawn here from the example's generator,
  width first, then height, only along a side with excess), then the flip (--random-flip).

--bucket-no-upscale (kohya's): no list; an image larger than A is shrunk to about area A keeping its aspect ratio
(the rounded side of the two that keeps the ratio closer), a smaller one keeps its size, and the bucket is that
size rounded down to multiples of d, so nothing is enlarged; min and max are then ignored (kohya warns the same).

kohya's checks are kept: min and max are rounded to multiples of d (min down, max up), and the resolution must
lie between them. Bucket sides must be multiples of 8 (the VAE's factor), so d must be too (kohya's default 64
also keeps SD's latents divisible by the U-Net's three downsamplings; minisd's U-Net takes any latent size).

Two differences from kohya, neither in the geometry: the size is that of the upright image (EXIF orientation
applied, as everywhere in minisd; kohya reads the stored size), and the resize is PIL's antialiased bilinear, as
for square crops (data.py), where kohya shrinks with OpenCV's INTER_AREA and enlarges with Lanczos.
"""
import json
import math
import os

import torch
from PIL import Image



def check(resolution, min_size, max_size, steps):
    """(min_size, max_size) rounded to multiples of steps as kohya rounds them, or a one-line error."""
    if not (isinstance(steps, int) and steps > 0 and steps % 8 == 0):
        raise ValueError(f"--bucket-reso-steps must be a positive multiple of 8 (the VAE's factor), got {steps}")
    if min_size < 1 or max_size < 1:
        raise ValueError(f"--min-bucket-reso and --max-bucket-reso must be positive, got {min_size} and {max_size}")
    min_size -= min_size % steps                           # kohya: adjust_min_max_bucket_reso_by_steps
    if max_size % steps:
        max_size += steps - max_size % steps
    if not min_size <= resolution <= max_size:
        raise ValueError(f"the resolution {resolution} must lie between --min-bucket-reso {min_size} and "
                         f"--max-bucket-reso {max_size} (multiples of --bucket-reso-steps {steps})")
    return min_size, max_size


def resolutions(resolution, min_size=256, max_size=1024, steps=64):
    """The sorted bucket list (w, h) for an area of resolution^2 (module docstring)."""
    area = resolution * resolution
    side = int(math.sqrt(area) // steps) * steps
    out = {(side, side)}
    for w in range(min_size, max_size + 1, steps):
        h = min(max_size, (area // w) // steps * steps)
        if h >= min_size:
            out.update({(w, h), (h, w)})
    return sorted(out)


def select(width, height, buckets, steps, no_upscale=False, area=None):
    """(bucket (w, h), resized (w, h)) of an image of width x height (module docstring). buckets: resolutions(...)
    (unused with no_upscale); area: resolution^2 (used with no_upscale)."""
    ratio = width / height
    if not no_upscale:
        bucket = (width, height)
        if bucket not in buckets:                         # the first nearest on a tie, as numpy's argmin
            bucket = min(buckets, key=lambda b: abs(b[0] / b[1] - ratio))
        scale = bucket[1] / height if ratio > bucket[0] / bucket[1] else bucket[0] / width
        return bucket, (int(width * scale + 0.5), int(height * scale + 0.5))
    if width * height > area:                              # shrink to about the area, keeping the ratio
        def to_steps(x):
            x = int(x + 0.5)
            return x - x % steps
        w = math.sqrt(area * ratio)
        h = area / w
        w_rounded, h_rounded = to_steps(w), to_steps(h)
        by_width = w_rounded / max(to_steps(w_rounded / ratio), 1)      # kohya divides; a 0 side fails below
        by_height = to_steps(h_rounded * ratio) / max(h_rounded, 1)
        if abs(by_width - ratio) < abs(by_height - ratio):
            resized = (w_rounded, int(w_rounded / ratio + 0.5))
        else:
            resized = (int(h_rounded * ratio + 0.5), h_rounded)
    else:
        resized = (width, height)
    return (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps), resized


def assign(examples, resolution, min_size=256, max_size=1024, steps=64, no_upscale=False):
    """[(bucket, resized)] of each example (its size: Example.size, or read from its file)."""
    min_size, max_size = check(resolution, min_size, max_size, steps)
    buckets = resolutions(resolution, min_size, max_size, steps)
    out = []
    for e in examples:
        size = e.size or e.image().size
        bucket, resized = select(*size, buckets, steps, no_upscale, resolution * resolution)
        if min(bucket) < 8:
            raise ValueError(f"{e.path} ({size[0]} x {size[1]}) is too small for --bucket-no-upscale with "
                             f"--bucket-reso-steps {steps}: its bucket would be {bucket[0]} x {bucket[1]}")
        out.append((bucket, resized))
    return out


def crop(image, bucket, resized, center_crop=True, random_flip=False, generator=None):
    """`image` (PIL) resized to `resized` and cropped to `bucket` (module docstring), maybe flipped."""
    if image.size != tuple(resized):
        image = image.resize(tuple(resized), Image.BILINEAR)
    offsets = []
    for excess in (resized[0] - bucket[0], resized[1] - bucket[1]):      # width first, as kohya
        if excess <= 0 or center_crop:
            offsets.append(max(excess, 0) // 2)
        else:
            offsets.append(int(torch.randint(0, excess + 1, (1,), generator=generator)))
    left, top = offsets
    image = image.crop((left, top, left + bucket[0], top + bucket[1]))
    if random_flip and torch.rand(1, generator=generator) < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image


def table(examples, assigned):
    """Lines of the bucket table printed at the start: each bucket, its images and its examples per epoch."""
    count = {}
    for e, (bucket, _) in zip(examples, assigned):
        images, per_epoch = count.get(bucket, (0, 0))
        count[bucket] = (images + 1, per_epoch + e.repeats)
    lines = [f"{'bucket':>11}  {'images':>6}  {'per epoch':>9}"]
    lines += [f"{f'{w} x {h}':>11}  {n:>6}  {r:>9}" for (w, h), (n, r) in sorted(count.items())]
    return lines


def write_json(path, folders):
    """buckets.json: {role: {image path relative to its data folder: [width, height]}} for the run's folders
    (folders: [(role, root, examples, assigned)]); written to a temporary name, then renamed into place."""
    lines = []
    for role, root, examples, assigned in folders:
        pairs = [f"  {json.dumps(os.path.relpath(e.path, root) if root else e.path)}: {list(bucket)}"
                 for e, (bucket, _) in zip(examples, assigned)]
        lines.append(f" {json.dumps(role)}: {{\n" + ",\n".join(pairs) + "\n }")
    with open(path + ".tmp", "w") as f:          # one image a line
        f.write("{\n" + ",\n".join(lines) + "\n}\n")
    os.replace(path + ".tmp", path)
