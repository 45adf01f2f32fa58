"""What a trained file says about its run, in its safetensors header, as kohya's sd-scripts write it: the `ss_*`
keys that A1111's and ComfyUI's model browsers show (train_network.py, fine_tune.py, train_textual_inversion.py)
and the SAI model spec's `modelspec.*` keys (sd-scripts' library/sai_model_spec.py, build_metadata). The header
holds strings only (safetensors' rule), so numbers are written with str() and the run's whole arguments, the
args.json of the run folder, as JSON in `minisd_args`.

minisd writes it into OUT/model.safetensors (full fine-tuning and DreamBooth, single-file format), the LoRA file
(both formats) and both embedding files of textual inversion, snapshots included (ss_steps = the step of the
file). minisd reads none of it back when it loads a file: keys it does not know are ignored.
"""
import datetime
import json
import os
import random
import time

# sd-scripts' library/sai_model_spec.py
ARCHITECTURES = {("sd1", "eps"): "stable-diffusion-v1", ("sd2", "eps"): "stable-diffusion-v2-512",
                 ("sd2", "v"): "stable-diffusion-v2-768-v"}
ADAPTERS = {"lora": "lora", "textual_inversion": "textual-inversion"}
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"


def base_model_version(model_config):
    """kohya's ss_base_model_version (model_util.get_model_version_str_for_sd1_sd2): sd_v1, sd_v2, sd_v2_v; an
    SD1-family model (CLIP ViT-L text encoder, quick_gelu) predicting v is sd_v1_v there as well."""
    sd2 = model_config.text.activation == "gelu"            # OpenCLIP: the SD2 family
    return f"sd_{'v2' if sd2 else 'v1'}{'_v' if model_config.prediction == 'v' else ''}"


def run_metadata(cfg, method, args, source, model_config, streams, resolution, started=None, session=None):
    """The keys every file of one run shares (the step and the finish time are added per file by `for_file`).

    cfg: the TrainSettings (after --num-train-epochs set the steps); method: "finetune", "dreambooth", "lora",
    "textual_inversion"; args: the run's arguments as args.json holds them; source: the base model's file or
    folder; streams: batches.Stream, the training images first, DreamBooth's class images second."""
    started = time.time() if started is None else started
    sd2 = model_config.text.activation == "gelu"
    arch = ARCHITECTURES.get(("sd2" if sd2 else "sd1", model_config.prediction), "stable-diffusion-v1")
    if method in ADAPTERS:
        arch += "/" + ADAPTERS[method]
    world = args.get("processes", 1)
    meta = {
        "ss_session_id": str(random.randint(0, 2 ** 32) if session is None else session),
        "ss_training_started_at": str(started),
        "ss_output_name": os.path.basename(os.path.normpath(cfg.out)),
        "ss_sd_model_name": os.path.basename(os.path.normpath(str(source))),
        "ss_base_model_version": base_model_version(model_config),
        "ss_v2": str(sd2),
        "ss_v_parameterization": str(model_config.prediction == "v"),
        "ss_training_comment": f"minisd train {method.replace('_', '-')}",
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_lr_scheduler": str(cfg.lr_scheduler),
        "ss_lr_warmup_steps": str(cfg.lr_warmup_steps),
        "ss_max_train_steps": str(cfg.max_train_steps),
        # kohya counts an image once per repeat (a 10_name folder: 10 times), as an epoch holds it
        "ss_num_train_images": str(len(streams[0].entries())),
        "ss_num_reg_images": str(len(streams[1].entries()) if len(streams) > 1 else 0),
        "ss_batch_size_per_device": str(cfg.train_batch_size),
        "ss_total_batch_size": str(cfg.train_batch_size * world * cfg.gradient_accumulation_steps),
        "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
        "ss_mixed_precision": str(cfg.mixed_precision),
        "ss_seed": str(cfg.seed),
        "ss_resolution": str((resolution, resolution)),
        "ss_noise_offset": str(cfg.noise_offset),
        "ss_min_snr_gamma": str(cfg.snr_gamma),
        "ss_max_grad_norm": str(cfg.max_grad_norm),
        "ss_optimizer": "torch.optim.AdamW",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch,
        # sai_model_spec.build_metadata: a v1/v2 LoRA is diffusers' implementation, a checkpoint or an embedding
        # Stability AI's
        "modelspec.implementation": IMPL_DIFFUSERS if method == "lora" else IMPL_STABILITY_AI,
        "modelspec.title": os.path.basename(os.path.normpath(cfg.out)),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if model_config.prediction == "v" else "epsilon",
        "modelspec.date": datetime.datetime.fromtimestamp(int(started)).isoformat(),
        "minisd_method": method,
        "minisd_args": json.dumps(args, sort_keys=True),
    }
    for flag in ("text_encoder_lr", "unet_lr"):
        if getattr(cfg, flag, None) is not None:
            meta[f"ss_{flag}"] = str(getattr(cfg, flag))
    return meta


def for_file(meta, step):
    """`meta` for the file of `step` (a snapshot's, or the last step's): ss_steps and the time it was written."""
    return {**meta, "ss_steps": str(step), "ss_training_finished_at": str(time.time())}
