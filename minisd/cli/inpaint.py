"""`minisd inpaint` and `minisd outpaint`: Pipeline.inpaint from the command line (minisd/inpaint.py has the steps).

    minisd inpaint "a red hat" --init-image photo.png --mask mask.png --model sd-v1-5-inpainting.ckpt
    minisd inpaint "a red hat" --init-image photo.png --mask mask.png --only-masked --padding 32 --strength 0.75
    minisd outpaint "a beach at dusk" --init-image photo.png --extend left=128,right=128 --model sd15

Both take the flags every generating command takes (cli/generate.py). --width/--height are the size the
only-masked crop is inpainted at (default: the model's), or else the size the picture is resized to (default:
its own). The PNG's `parameters` hold the mask settings under A1111's labels ("Mask blur", "Inpaint area",
"Masked area padding", "Mask mode", "Masked content", "Denoising strength").
"""
import time

from PIL import ImageChops

from .. import inpaint
from .generate import (_add_output, _step_saver, add_control_flags, add_generation_flags, generation_kwargs,
                       model_fields, read_image, recorded_prompt, save_grid, save_results, start_run)

# A1111's words for the masked content modes in its infotext
def _add_mask_flags(p, masked_content):
    g = p.add_argument_group("mask", "--width/--height: the size the --only-masked box is inpainted at (default: "
                                     "the model's); without --only-masked, the size the picture is resized to "
                                     "(default: its own)")
    g.add_argument("--init-image", required=True, help="the picture to repaint (any mode; sides cut to multiples "
                                                       "of 8 by resizing)")
    g.add_argument("--strength", type=float, default=1.0,
                   help="0..1, as img2img's, over the masked area; 1 starts it from pure noise (default %(default)s)")
    g.add_argument("--mask-blur", type=int, default=4, metavar="PX",
                   help="blur of the mask's edge for the final composite, in pixels (default %(default)s)")
    g.add_argument("--invert-mask", action="store_true", help="repaint the black part instead of the white")
    g.add_argument("--masked-content", choices=inpaint.MASKED_CONTENT, default=masked_content,
                   help="what the masked area starts as: its original pixels, fill (the colours around it) or "
                        "latent-noise (default %(default)s)")
    g.add_argument("--only-masked", action="store_true",
                   help="inpaint only the box around the mask (plus --padding) at --width x --height, then paste it "
                        "back (A1111's 'Inpaint area: Only masked'): more detail in small areas")
    g.add_argument("--padding", type=int, default=32, metavar="PX",
                   help="pixels around the mask's box with --only-masked (default %(default)s)")
    g.add_argument("--no-composite", action="store_true",
                   help="keep the decoded picture as it is (diffusers' output) instead of pasting the original back "
                        "outside the mask (A1111's)")


def add_inpaint(p):
    _add_output(p)
    add_generation_flags(p)
    _add_mask_flags(p, "original")
    add_control_flags(p)
    p.add_argument("--mask", required=True, help="white = repaint; any mode and size (resized to the picture)")


def add_outpaint(p):
    _add_output(p)
    add_generation_flags(p)
    _add_mask_flags(p, "fill")
    add_control_flags(p)
    p.add_argument("--extend", required=True, metavar="SIDE=PX,...",
                   help="pixels to add, multiples of 8: e.g. left=128,right=128 (sides: left, right, top, bottom)")
    p.add_argument("--mask", default=None,
                   help="optional: more to repaint, white, at the size of the extended canvas")


def _picture_and_mask(args):
    """The picture and mask Pipeline.inpaint gets: as given (inpaint), or the extended canvas and its new area
    (outpaint; with --mask, that mask's white too)."""
    image = read_image(args.init_image, "--init-image")
    mask = read_image(args.mask, "--mask") if args.mask else None
    if args.command == "inpaint":
        return image, mask
    canvas, new_area = inpaint.extend(image, **inpaint.parse_extend(args.extend))
    if mask is not None:
        if mask.size != canvas.size:
            raise ValueError(f"--mask is {mask.width}x{mask.height}, but the canvas after --extend is "
                             f"{canvas.width}x{canvas.height}: give the mask at the extended size")
        new_area = ImageChops.lighter(new_area, mask.convert("L"))
    return canvas, new_area


def run_inpaint(args):
    """minisd inpaint / outpaint."""
    kwargs = generation_kwargs(args)            # a bad sampler, schedule, eta or churn fails before the model loads
    if not 0.0 < args.strength <= 1.0:
        raise ValueError(f"--strength must be in (0, 1], got {args.strength}")
    if args.mask_blur < 0 or args.padding < 0:
        raise ValueError(f"--mask-blur and --padding must be >= 0, got {args.mask_blur} and {args.padding}")
    image, mask = _picture_and_mask(args)
    pipe, controls, control_fields, seeds, paths = start_run(args)
    t0 = time.time()
    result = pipe.inpaint(args.prompt, image, mask, args.strength, seed=seeds,
                          callback=_step_saver(pipe, args.save_steps) if args.save_steps else None,
                          mask_blur=args.mask_blur, invert_mask=args.invert_mask, masked_content=args.masked_content,
                          only_masked=args.only_masked, padding=args.padding, composite=not args.no_composite,
                          controls=controls, **kwargs)
    width, height = result.images[0].size
    mask_fields = inpaint.mask_parameters(args.strength, args.mask_blur, args.invert_mask, args.masked_content,
                                          args.only_masked, args.padding)
    prompt, lora_fields = recorded_prompt(args, pipe.embeddings)
    written = save_results(pipe, args, kwargs, result, paths, width, height, prompt,
                           {**mask_fields, **control_fields, **model_fields(args), **lora_fields})
    if args.grid:
        save_grid(args, written)
    print(f"{len(result.images)} image(s) in {time.time() - t0:.1f} s on {pipe.device} ({pipe.dtype})")
