"""The tiny built-in model: SD 1.5's networks at a small size (config.TINY), trained by minisd's own loop on a
procedural world of coloured shapes, so that everything runs offline in seconds.

  shapes.py           the world: captions, images drawn from (seed, index), and the rule-based judge that reads
                      an image
  recipe.py           the three-phase training recipe (`minisd train-tiny --out DIR`) that made the shipped weights
  features_recipe.py  the training of the feature network that `--features tiny` reads
                      (minisd/metrics/tiny_features.py; `python -m minisd.tiny.features_recipe --out DIR`)
  evaluate.py         adherence (how often the judge reads what the prompt asked for) and the training sample grids

The weights themselves ship in minisd/assets/ and load like any checkpoint (model.tiny_model_path()).
"""
