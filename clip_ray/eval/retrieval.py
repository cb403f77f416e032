"""Image-text retrieval recall, with several captions per image.

An image counts as found by a caption when it is that caption's image; a caption
search for an image succeeds when *any* of the image's captions ranks within k,
as the Flickr/COCO literature scores it.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch
from torch import Tensor


@torch.no_grad()
def retrieval_recall(image_features: Tensor, text_features: Tensor, text_image_index: Tensor,
                     ks: tuple[int, ...] = (1, 5, 10), chunk_size: int = 1024) -> dict[str, float]:
    """Recall@k in both directions.

    image_features [I, D] and text_features [T, D] are L2-normalised; text_image_index [T]
    gives the row of each caption's image. Similarities are computed in chunks of images
    so that memory stays at chunk x T, not I x T, for large evaluation sets.
    """
    num_images, num_texts = image_features.shape[0], text_features.shape[0]
    if text_image_index.shape != (num_texts,):
        raise ValueError(f"text_image_index has shape {tuple(text_image_index.shape)}, expected ({num_texts},)")
    if num_texts and (text_image_index.min() < 0 or text_image_index.max() >= num_images):
        raise ValueError("text_image_index points outside the image rows")
    image_features = image_features.float()
    text_features = text_features.float()
    text_image_index = text_image_index.to(image_features.device)
    # Similarity of every caption with its own image, for text -> image ranks.
    own_sim = (text_features * image_features[text_image_index]).sum(-1)
    image_rank = torch.empty(num_images, dtype=torch.long, device=image_features.device)
    text_rank = torch.zeros(num_texts, dtype=torch.long, device=image_features.device)
    for start in range(0, num_images, chunk_size):
        sims = image_features[start:start + chunk_size] @ text_features.T  # [c, T]
        rows = torch.arange(start, start + sims.shape[0], device=sims.device)
        is_own = text_image_index.unsqueeze(0) == rows.unsqueeze(1)  # [c, T]
        # image -> text: rank of the best own caption = how many captions score higher.
        best_own = sims.masked_fill(~is_own, float("-inf")).max(dim=1).values
        image_rank[start:start + sims.shape[0]] = (sims > best_own.unsqueeze(1)).sum(dim=1)
        # text -> image: count images in this chunk that beat the caption's own image
        # (the own entry is masked: its two computations may differ in the last bit).
        text_rank += ((sims > own_sim.unsqueeze(0)) & ~is_own).sum(dim=0)
    has_caption = torch.zeros(num_images, dtype=torch.bool, device=image_features.device)
    has_caption[text_image_index] = True
    image_rank = image_rank[has_caption]
    metrics = {}
    for k in ks:
        metrics[f"image_to_text_R@{k}"] = (image_rank < k).float().mean().item()
        metrics[f"text_to_image_R@{k}"] = (text_rank < k).float().mean().item()
    return metrics


def group_by_image(image_ids: Sequence[Hashable]) -> tuple[list[int], list[int]]:
    """Pairs grouped by their image: (the first row of each distinct image, in order of first appearance;
    each row's image number, an index into those first rows). Feed retrieval_recall the image features of
    the first rows and every row's text features, with the image numbers as text_image_index."""
    numbers: dict[Hashable, int] = {}
    first_rows, owners = [], []
    for row, image_id in enumerate(image_ids):
        if image_id not in numbers:
            numbers[image_id] = len(numbers)
            first_rows.append(row)
        owners.append(numbers[image_id])
    return first_rows, owners
