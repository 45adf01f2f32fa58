"""Evaluation metrics for generated images, each equal to a reference implementation (tests/test_metrics.py).

    inception.py        Inception-v3 as FID measures it (the 2015-12-05 TF graph, pytorch-fid's weights file)
    resize.py           how each FID implementation makes the 299x299 input (pytorch-fid, clean-fid,
                        torchmetrics, TensorFlow/torch-fidelity), side by side
    fid.py              Fréchet Inception Distance, statistics files, `minisd fid`
    inception_score.py  Inception Score as torchmetrics computes it
    clip_image.py       CLIP's ViT image tower (OpenAI ViT-L/14), from transformers' or open_clip's layout
    clip_score.py       CLIP score as torchmetrics computes it, with minisd's text encoder for the captions
    tiny_features.py    a small classifier of the tiny model's shapes world: FID's feature space for offline runs
                        (`--features tiny`; weights ship in minisd/assets/, minisd/train/tiny_features.py made them)

Runtime needs nothing beyond minisd's own dependencies (torch, numpy, pillow). The Inception and CLIP weights are
the users' files (fetched or given); only the tiny feature network's 0.4 MB ship with minisd.
"""
