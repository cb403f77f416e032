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
def classification_metrics(logits: Tensor, labels: Tensor, topk: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy and mean per-class recall of [N, C] class scores against labels in 0..C-1.

    Top-k caps k at C (top-5 of three classes is 1.0). Mean per-class recall averages, over the classes
    present in `labels`, the share of each class's rows whose top-1 prediction is right: the metric the
    CLIP paper reports for imbalanced sets, where top-1 would reward the big classes.
    """
    if logits.ndim != 2 or labels.ndim != 1 or len(logits) != len(labels):
        raise ValueError(f"logits {tuple(logits.shape)} must be [N, C] with one label per row; "
                         f"labels {tuple(labels.shape)}")
    if not len(labels):
        raise ValueError("classification metrics need at least one labelled row")
    num_classes = logits.shape[1]
    labels = labels.to(logits.device).long()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels run from {labels.min().item()} to {labels.max().item()}; "
                         f"the {num_classes} scored classes need labels in 0..{num_classes - 1}")
    ranked = logits.topk(min(max(topk), num_classes), dim=1).indices
    hits = ranked == labels.unsqueeze(1)
    metrics = {f"top{k}": hits[:, :min(k, num_classes)].any(dim=1).float().mean().item() for k in topk}
    per_class_count = torch.bincount(labels, minlength=num_classes).float()
    per_class_right = torch.bincount(labels[hits[:, 0]], minlength=num_classes).float()
    present = per_class_count > 0
    metrics["mean_per_class_recall"] = (per_class_right[present] / per_class_count[present]).mean().item()
    return metrics


@torch.no_grad()
def zeroshot_accuracy(image_features: Tensor, classifier: Tensor, labels: Tensor,
                      topk: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy and mean per-class recall of normalised image features against a [D, C] classifier."""
    return classification_metrics(image_features.float() @ classifier, labels, topk)
