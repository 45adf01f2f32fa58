"""8. img2img: sampling from a noised copy of an image; a strength grid 0.2 .. 1.0; how strength maps to steps."""
# %% [markdown]
# img2img (SDEdit, Meng et al. 2022) needs nothing new. Encode the image with the VAE (tutorial 3), noise it with
# the forward process (tutorial 4) to some level sigma_start, and run only the part of the sampling loop
# (tutorial 6) below sigma_start. Little noise keeps the layout and colours; lots of noise keeps little.
#
# `strength` in [0, 1] picks sigma_start, counted in steps. `Pipeline.img2img` follows diffusers' arithmetic, so a
# seed gives the same image there:
#
#     sigmas = the usual `steps` noise levels, then 0
#     run    = int(steps * strength)             # how many steps actually run
#     sigmas = sigmas[steps - run:]              # the last `run` of them
#     x      = x_0 + sigmas[0] * noise           # diffusion.add_noise: the forward process in sigma form

# %%
from minisd.tiny import shapes
from minisd.model import load_model, tiny_model_path
from minisd.pipeline import Pipeline

pipe = Pipeline(load_model(tiny_model_path(), verbose=False))     # the tiny built-in model, on the CPU in fp32
steps = 20
plan = pipe.plan("dpmpp_2m", steps=steps)         # the default sampler, its schedule (karras) and its sigmas
sigmas = plan.sigmas
print(f"{steps} steps, {plan.schedule} schedule, sigma_max = {sigmas[0]:.2f}")
strengths = [0.2, 0.4, 0.6, 0.8, 1.0]
for strength in strengths:
    run = int(steps * strength)
    start = sigmas[steps - run].item()
    print(f"strength {strength:.1f}: runs {run:>2} of {steps} steps from sigma {start:6.3f}, "
          f"where the image is {1 / (1 + start ** 2) ** 0.5:.0%} of the signal (sqrt(abar))")

# %% [markdown]
# Two things to notice. First, strength is *not* the fraction of noise: the Karras schedule puts most steps at low
# sigma, so at strength 0.6 the image is already less than half of the signal. Second, the step count is truncated:
# at few steps, low strengths round down (at 4 steps, strength 0.2 runs int(0.8) = 0 steps and returns the input
# unchanged; minisd says so instead of failing).

# %%
for n in (4, 10, 20, 50):
    print(f"{n:>2} steps:", "  ".join(f"s={s}: {int(n * s):>2}" for s in strengths))

# %% [markdown]
# ## The strength grid
# The input is a red circle on blue; the prompt asks for a yellow square on black. Each column is a strength; the
# first two rows are two seeds at the default guidance (cfg 7.5), the last repeats seed 0 at cfg 1. Guidance
# multiplies the prompt's pull at *every* noise level, including the low ones a small strength runs, so compare
# how much of the input survives at low strength in the first and last rows.

# %%
from _figures import grid, save

init = shapes.draw("red", "circle", "blue")
prompt = "a yellow square on a black background"
rows = []
for seed, cfg in ((0, 7.5), (1, 7.5), (0, 1.0)):
    row = [init]
    for strength in strengths:
        image = pipe.img2img(prompt, init, strength=strength, steps=steps, seed=seed, cfg=cfg).images[0]
        row.append(image)
        print(f"seed {seed}, cfg {cfg}, strength {strength}: judge reads {shapes.judge(image)}")
    rows.append(row)
save(grid(rows, labels=["input"] + [f"s={s}" for s in strengths],
          row_labels=["seed 0", "seed 1", "0, cfg 1"], label_width=56), "08_strength_grid.png")

# %% [markdown]
# At strength 1.0 every step runs, but the start is still x0 + sigma_max * noise (diffusers' arithmetic, which
# minisd follows so that the same seed gives the same image): at sigma_max = 14.6 the image is 7% of the signal, and
# its broad colours can survive. The same
# arithmetic with `steps=50` gives 50 * strength steps: a higher step count refines the path, it does not change
# how much of the image survives.
#
# Next: tutorial 9, from the tiny model to the real ones.
