"""A procedural video world: colored shapes moving and bouncing over simple backgrounds.

Every clip is a pure function of its seed, so the world is an unlimited, exactly
reproducible dataset (the embedded model is trained on it) and a ground truth for
measuring consistency (``tools/eval_consistency.py``, ``tools/santa.py``). Captions follow a
small grammar: ``"a red circle moves left on a black background"``, or for two objects
``"a red circle and a blue square move on a gray background"``. In world v2
(``open_identity=True``) a third of them leave the body color out (``"a circle moves left on a
black background"``) and every object wears a hat of another palette color that no caption names.
"""

from .reader import Reading, centroid, classify_frame, foreground_mask, read_background, read_frame
from .scenes import (
    SHAPES,
    COLORS,
    BACKGROUNDS,
    DIRECTIONS,
    OPEN_COLOR,
    HAT_DEPTH,
    VOCAB,
    WorldObject,
    Scene,
    caption,
    parse_caption,
    scene_from_caption,
    random_scene,
    positions,
    background_image,
    shape_mask,
    render,
    object_mask,
)
