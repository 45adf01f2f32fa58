"""Annotators: the preprocessors that turn a photo into a ControlNet condition image (ControlNet's own name for
them, lllyasviel/ControlNet's `annotator/` and controlnet_aux), each written by hand in its own module:

    canny.py      canny(image, low=100, high=200) -> PIL.Image   edges, equal to cv2.Canny with those thresholds
    openpose.py   openpose(image, weights=...) -> PIL.Image      the 18-keypoint body model, its peaks, limbs and
                                                                 skeleton drawing, equal to controlnet_aux's
                                                                 OpenposeDetector (body only)

Each returns an RGB image of the input's size, the condition image a ControlNet of that kind was trained on.
"""
