"""The tiny built-in model: SD 1.5's networks at a small size (config.TINY), trained by minisd's own loop on a
procedural world of coloured shapes, so that everything runs offline in seconds.

  shapes.py           the world: captions, images drawn from (seed, index), and the rule-based judge that reads
                      an image
  evaluate.py         adherence (how often the judge reads what the prompt asked for) and the training sample grids
  new_word.py         a word the model does not know, for textual inversion
  subject.py          subjects it has never seen (the diamond, ring, cross, pair), for DreamBooth and LoRA

How it was trained is training's: minisd/train/tiny.py, the three-phase recipe (`minisd train-tiny --out DIR`) that
made the shipped weights, and minisd/train/tiny_features.py, the feature network that `--features tiny` reads
(minisd/metrics/tiny_features.py; `minisd train-tiny-features --out DIR`).

The weights themselves ship in minisd/assets/ and load like any checkpoint (model.tiny_model_path()).
"""
