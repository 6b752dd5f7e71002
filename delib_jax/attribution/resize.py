"""Attribution maps brought to the image: bilinear upsampling of the last two axes."""

from __future__ import annotations

import jax

Array = jax.Array


def upsample_maps(maps: Array, size: tuple[int, int]) -> Array:
    """Bilinear resize (..., H, W) -> (..., H_img, W_img), half-pixel centres (torch's align_corners=False).

    Linear in the maps, so first + second order upsample to the upsampled sum."""
    size = tuple(int(s) for s in size)
    if maps.shape[-2:] == size:
        return maps
    return jax.image.resize(maps, (*maps.shape[:-2], *size), method="bilinear")
