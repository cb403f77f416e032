"""Zero-shot classification: class names x prompt templates become a linear classifier.

Each class's weight is the mean of its normalised prompt embeddings, normalised again
(the prompt ensembling of the CLIP paper).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


@torch.no_grad()
def zeroshot_classifier(encode_text: Callable[[Tensor], Tensor], tokenize: Callable[[list[str]], Tensor],
                        class_names: Sequence[str], templates: Sequence[str],
                        device: torch.device | str = "cpu") -> Tensor:
    """Returns class weights [D, C]; `encode_text` must return normalised features."""
    if not class_names:
        raise ValueError("zero-shot classification needs at least one class name")
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("every prompt template must contain '{}'")
    weights = []
    for name in class_names:
        tokens = tokenize([template.format(name) for template in templates]).to(device)
        embedding = encode_text(tokens).float().mean(dim=0)
        weights.append(embedding / embedding.norm())
    return torch.stack(weights, dim=1)


@torch.no_grad()
def zeroshot_accuracy(image_features: Tensor, classifier: Tensor, labels: Tensor,
                      topk: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy of normalised image features against a [D, C] classifier."""
    logits = image_features.float() @ classifier
    num_classes = classifier.shape[1]
    ranked = logits.topk(min(max(topk), num_classes), dim=1).indices
    hits = ranked == labels.to(ranked.device).unsqueeze(1)
    return {f"top{k}": hits[:, :min(k, num_classes)].any(dim=1).float().mean().item() for k in topk}
