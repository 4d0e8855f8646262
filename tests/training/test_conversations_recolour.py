"""The embedded edit expert's in-place recolour passes the closed-loop eval's pixel check (#26).

``experts.edit.recolour_pixels`` shifts an object's colour inside its mask, keeping its shape, edges
and shading; ``training.conversations.recolour_check`` is what the eval asks of a recolour turn (most
of the object's pixels now nearest the new colour, nothing outside the mask changed). Scenes are drawn
from a seed that is not the eval's held-out one.
"""

from __future__ import annotations

import random

import numpy as np

from experts.edit import recolour_pixels
from training import conversations as cv
from training.shapes import COLOURS, make_scene, scene_seed


def test_recolour_in_place_passes_the_eval_check_with_exact_and_loose_masks() -> None:
    rng = random.Random(0)
    shares = []
    for i in range(12):
        scene = make_scene(scene_seed(4242, i), size=256)
        before = np.asarray(scene.image.convert("RGB"), np.uint8)
        obj = scene.objects[0]
        colour2 = rng.choice([c for c in COLOURS if c != obj.colour])
        for mask in (obj.mask, cv.dilate(obj.mask, 2)):  # the segmenter's mask, a little too large
            after = recolour_pixels(before, mask, colour2)
            assert after is not None
            check = cv.recolour_check(before, after, obj.mask, colour2)
            assert check["ok"], check
            assert np.array_equal(after[~mask], before[~mask])  # outside the mask: untouched
            shares.append(check["new_colour_share"])
    assert min(shares) >= 0.9


def test_a_mask_without_an_object_is_left_to_the_generator() -> None:
    scene = make_scene(scene_seed(4242, 0), size=256)
    before = np.asarray(scene.image.convert("RGB"), np.uint8)
    empty_corner = np.zeros(before.shape[:2], bool)
    free = ~np.logical_or.reduce([o.mask for o in scene.objects])
    ys, xs = np.nonzero(free)
    empty_corner[ys[0], xs[0]] = True
    assert recolour_pixels(before, empty_corner, "blue") is None
    assert recolour_pixels(before, scene.objects[0].mask, "no-such-colour") is None
