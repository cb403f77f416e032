"""Retrieval recall and zero-shot accuracy on hand-built features with known answers."""

import pytest
import torch
import torch.nn.functional as F

from clip_ray.eval.retrieval import retrieval_recall
from clip_ray.eval.zeroshot import classification_metrics, zeroshot_accuracy, zeroshot_classifier


def _unit(rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_retrieval_counts_any_caption_of_an_image():
    # Three images on the axes; captions 0,1 belong to image 0, caption 2 to image 1, caption 3 to image 2.
    images = _unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    texts = _unit([
        [0, 1, 0.1],    # image 0's first caption points at image 1 (a miss at rank 1)
        [1, 0.5, 0],    # image 0's second caption is right
        [0, 1, 0],      # image 1: right
        [0.5, 0, 0.4],  # image 2's caption leans towards image 0
    ])
    owner = torch.tensor([0, 0, 1, 2])
    m = retrieval_recall(images, texts, owner, ks=(1, 2, 3))
    # image -> text: image 0 finds caption 1 first (rank 0); image 1 finds caption 2 (rank 0);
    # image 2 finds caption 3 first (0.62 against 0.10 for caption 0).
    assert m["image_to_text_R@1"] == 1.0
    # text -> image: caption 0 ranks image 0 last (rank 2); caption 3 ranks image 2 second (rank 1).
    assert m["text_to_image_R@1"] == 0.5
    assert m["text_to_image_R@2"] == 0.75
    assert m["text_to_image_R@3"] == 1.0


def test_retrieval_chunking_matches_one_pass():
    torch.manual_seed(0)
    images = F.normalize(torch.randn(37, 8), dim=-1)
    texts = F.normalize(torch.randn(111, 8), dim=-1)
    owner = torch.arange(111) % 37
    whole = retrieval_recall(images, texts, owner, chunk_size=1000)
    chunked = retrieval_recall(images, texts, owner, chunk_size=5)
    assert whole == chunked
    perfect = retrieval_recall(images, images[owner], owner)
    assert perfect["image_to_text_R@1"] == 1.0 and perfect["text_to_image_R@1"] == 1.0


def test_zeroshot_classifier_ensembles_prompts_and_scores_topk():
    vocab = {"cat": [1.0, 0, 0], "dog": [0, 1.0, 0], "car": [0, 0, 1.0]}

    def tokenize(texts):
        return torch.tensor([[i for i, name in enumerate(vocab) if name in t][0] for t in texts])

    def encode_text(ids):
        return _unit([vocab[list(vocab)[i]] for i in ids.tolist()])

    classifier = zeroshot_classifier(encode_text, tokenize, list(vocab), ["a {}.", "a photo of a {}."])
    assert classifier.shape == (3, 3)
    images = _unit([[0.9, 0.1, 0], [0.2, 0.1, 1.0], [0.6, 0.5, 0]])
    labels = torch.tensor([0, 2, 1])
    acc = zeroshot_accuracy(images, classifier, labels, topk=(1, 2))
    assert acc["top1"] == pytest.approx(2 / 3)
    assert acc["top2"] == 1.0


def test_mean_per_class_recall_weighs_every_class_alike():
    # Six rows of class 0 (five right), two of class 1 (none right), one of class 2 (right); class 3 never occurs.
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 0, 0, 0, 0, 2, 0, 2, 2])
    logits = F.one_hot(predicted, 4).float()
    logits[:, 1] += 0.5  # class 1 is every row's second guess
    m = classification_metrics(logits, labels, topk=(1, 2))
    assert m["top1"] == pytest.approx(6 / 9)
    assert m["mean_per_class_recall"] == pytest.approx((5 / 6 + 0 / 2 + 1 / 1) / 3)  # 0.611 against top-1's 0.667
    assert m["top2"] == pytest.approx(8 / 9)  # only row 5 (class 0, guessed 2 then 1) misses
    with pytest.raises(ValueError, match="labels run from 0 to 4"):
        classification_metrics(logits[:2], torch.tensor([0, 4]))


def test_zeroshot_accuracy_reports_mean_per_class_recall():
    classifier = _unit([[1, 0], [0, 1]]).T
    images = _unit([[1, 0.1], [1, 0.2], [1, 0.3], [0.1, 1], [1, 0.9]])
    m = zeroshot_accuracy(images, classifier, torch.tensor([0, 0, 0, 1, 1]))
    assert set(m) == {"top1", "top5", "mean_per_class_recall"}
    assert m["top1"] == pytest.approx(4 / 5) and m["top5"] == 1.0
    assert m["mean_per_class_recall"] == pytest.approx((3 / 3 + 1 / 2) / 2)
