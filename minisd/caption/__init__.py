"""Captioning: BLIP (blip.py) and BLIP-2 (blip2.py) written by hand, with their tokenizers, image processing and
decoding (decode.py). `minisd caption` (cli/caption.py) writes a caption file beside each picture."""
