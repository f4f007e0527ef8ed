"""The size an init image gives when no ``--size`` is: its own, floored to what the family's denoiser takes (8
on the UNet families, 16 on SD3, Flux and Chroma, whose tokens are 2x2 latent pixels, as diffusers' pipelines
floor it), so an init image of any size works on every family; an SD3 size that is no multiple of 16 is one line
(it was the pipeline's ValueError traceback)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


def _picture(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((width, height))


@pytest.mark.parametrize("family", ["sd1", "sd3", "flux", "chroma"])
def test_an_init_image_of_any_size_works(loaded_tiny, family):
    from sdcore.generate.pipeline import generate_images, init_image_size

    bundle = loaded_tiny(family)
    unit = 8 if family == "sd1" else 16
    init = _picture(88, 76)  # 88 = 11 * 8, 76 = 9 * 8 + 4: neither a multiple of 16
    expected = (88 - 88 % unit, 76 - 76 % unit)
    assert init_image_size(bundle, init) == expected
    (image,) = generate_images(bundle, ["a cat"], steps=1, seed=1, init_image=init, strength=0.5)
    assert image.size == expected


def test_sd3_size_not_a_multiple_of_16_is_one_line(loaded_tiny):
    from sdcore.errors import ConfigError
    from sdcore.generate.pipeline import generate_images

    with pytest.raises(ConfigError, match=r"^SD3 image sides must be multiples of 16, got 88x72$"):
        generate_images(loaded_tiny("sd3"), ["a cat"], steps=1, seed=1, width=88, height=72)
