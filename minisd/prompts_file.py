"""`--prompts-file FILE`: one image job per line, as A1111's "Prompts from file or textbox" script
(scripts/prompts_from_file.py of AUTOMATIC1111/stable-diffusion-webui).

A line is a prompt, or, if it holds "--", options in shell syntax, each setting that flag for that line only
(the command line's flags are the defaults of every line):

    a watercolour fox
    --prompt "a cat" --negative_prompt "ugly" --steps 20 --seed 3 --cfg_scale 7 --sampler_name "Euler a"

As A1111's `cmdargs`: --prompt and --negative_prompt take every word up to the next option; blank lines are
skipped. Where A1111 reports a line it cannot parse and then uses the whole line as the prompt, minisd stops
before any model loads with one line naming the file, the line and the problem, and it does the same for A1111's
options it has no counterpart for (styles, subseed, restore_faces, ...), rather than ignore what was asked.
"""
import argparse
import shlex

# A1111's option -> (the minisd flag's attribute, its type)
OPTIONS = {
    "prompt": ("prompt", str),
    "negative_prompt": ("negative_prompt", str),
    "seed": ("seed", int),
    "sampler_name": ("sampler", str),       # A1111's names ("Euler a", "DPM++ 2M Karras") are --sampler's too
    "steps": ("steps", int),
    "cfg_scale": ("cfg", float),
    "width": ("width", int),
    "height": ("height", int),
    "batch_size": ("batch_size", int),
    "n_iter": ("n_iter", int),              # batches of batch_size, seeds running on: seed + i
}
# A1111 options without a minisd counterpart
UNSUPPORTED = ("sd_model", "outpath_samples", "outpath_grids", "prompt_for_display", "styles", "subseed",
               "subseed_strength", "seed_resize_from_h", "seed_resize_from_w", "sampler_index", "restore_faces",
               "tiling", "do_not_save_samples", "do_not_save_grid")


def parse_line(line):
    """The options of one line: {"prompt": ...} for a plain prompt, else {A1111 option: value} (A1111's cmdargs).
    Raises ValueError naming the problem."""
    if "--" not in line:
        return {"prompt": line}
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise ValueError(f"cannot split it as a shell line ({e})") from None
    options, pos = {}, 0
    while pos < len(words):
        word = words[pos]
        if not word.startswith("--"):
            raise ValueError(f"{word!r} should be an option starting with --")
        tag = word[2:]
        if pos + 1 >= len(words):
            raise ValueError(f"{word} has no value")
        if tag in ("prompt", "negative_prompt"):       # every word up to the next option
            pos += 1
            text = [words[pos]]
            pos += 1
            while pos < len(words) and not words[pos].startswith("--"):
                text.append(words[pos])
                pos += 1
            options[tag] = " ".join(text)
            continue
        if tag in UNSUPPORTED:
            raise ValueError(f"{word} is an A1111 option minisd does not have")
        if tag not in OPTIONS:
            raise ValueError(f"unknown option {word} (minisd takes --{', --'.join(OPTIONS)})")
        kind = OPTIONS[tag][1]
        try:
            options[tag] = kind(words[pos + 1])
        except ValueError:
            raise ValueError(f"{word} needs {'an integer' if kind is int else 'a number'}, "
                             f"got {words[pos + 1]!r}") from None
        pos += 2
    if "prompt" not in options:
        raise ValueError("no --prompt")
    return options


def read_jobs(path, args):
    """One argparse Namespace per line of `path`: `args` with that line's options set. Raises ValueError
    "FILE line N: ..." at the first line it cannot use."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--prompts-file {path}: cannot read it ({e.__class__.__name__})") from None
    jobs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            options = parse_line(line.strip())
        except ValueError as e:
            raise ValueError(f"{path} line {number}: {e}") from None
        settings = dict(vars(args), n_iter=1)
        settings.update({OPTIONS[tag][0]: value for tag, value in options.items()})
        if settings["n_iter"] < 1:
            raise ValueError(f"{path} line {number}: --n_iter must be at least 1")
        jobs.append(argparse.Namespace(**settings))
    if not jobs:
        raise ValueError(f"--prompts-file {path}: no prompts in it")
    return jobs
