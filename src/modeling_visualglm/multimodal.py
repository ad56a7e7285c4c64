"""Image-placeholder checks shared by every family (CONTRACTS §4)."""

from __future__ import annotations

import torch


def placeholder_count_error(n_placeholders: int, num_images: int, num_image_tokens: int, image_token_id: int,
                            per_image: str = "") -> str | None:
    """The error message when ``n_placeholders`` placeholders cannot hold ``num_images`` images, else None."""
    expected = num_images * num_image_tokens
    if n_placeholders == expected:
        return None
    return (
        f"input_ids hold {n_placeholders} image placeholders (id {image_token_id}) but {num_images} image(s) need "
        f"{expected} ({num_image_tokens} each{per_image}); each image must be one run of {num_image_tokens} "
        "placeholders and pixel_values must hold exactly the images in order of appearance"
    )


def check_image_count(image_mask: torch.Tensor, num_images: int, num_image_tokens: int, image_token_id: int) -> None:
    """One host sync (call it on prefill only): the placeholders must hold exactly the given images."""
    error = placeholder_count_error(int(image_mask.sum()), num_images, num_image_tokens, image_token_id)
    if error:
        raise ValueError(error)
