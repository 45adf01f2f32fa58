"""Checkpoint layouts and conversions between them (the command: `minisd convert --help`, minisd/convert.py).

    io.py         reading/writing .safetensors (streamed, one tensor at a time) and .ckpt (weights_only)
    ldm.py        the original single-file layout (model.diffusion_model.*, first_stage_model.*, ...)
    diffusers.py  the diffusers folder layout (U-Net and VAE key tables generated from the config)
    text.py       the text encoder: transformers CLIPTextModel and open_clip names
    native.py     minisd's own layout (one .safetensors, config in its metadata)
    detect.py     which layout / model / prediction a checkpoint holds
"""
