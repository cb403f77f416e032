"""The linear probe (clip_ray/eval/linear_probe.py): the CLIP paper's logistic-regression protocol on features with
known answers, against scikit-learn called directly, and on real CIFAR-10 photos."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score
from threadpoolctl import threadpool_limits

from clip_ray.eval.linear_probe import DEFAULT_C_GRID, FALLBACK_C, few_shot_indices, linear_probe


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """The direct scikit-learn fits here are tiny; BLAS threads on a busy machine make them up to 100x slower
    (the probe limits itself the same way, SINGLE_THREAD_BELOW)."""
    with threadpool_limits(limits=1):
        yield


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clusters(means: np.ndarray, per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised draws around each class mean (unit noise), per_class rows of each class, like CLIP features."""
    labels = np.repeat(np.arange(len(means)), per_class)
    return _unit_rows(means[labels] + rng.normal(size=(len(labels), means.shape[1]))), labels


def _split_pair(means: np.ndarray, train_per_class: int, test_per_class: int, seed: int):
    rng = np.random.default_rng(seed)
    return (*_clusters(means, train_per_class, rng), *_clusters(means, test_per_class, rng))


def test_separated_clusters_are_near_perfect_and_overlapping_ones_are_not():
    directions = np.random.default_rng(0).normal(size=(6, 32))
    separated = linear_probe(*_split_pair(3.0 * directions, 30, 30, seed=1))
    overlapping = linear_probe(*_split_pair(0.15 * directions, 30, 30, seed=1))
    assert separated.top1 >= 0.99 and separated.top5 == 1.0
    assert 1 / 6 < overlapping.top1 < 0.7, overlapping
    assert separated.top1 - overlapping.top1 > 0.3
    assert (separated.train_count, separated.test_count, separated.num_classes) == (180, 180, 6)
    assert separated.val_count == 36  # 6 of each class's 30 train rows
    assert set(separated.metrics("probe/")) == {"probe/top1", "probe/top5", "probe/mean_per_class_recall", "probe/c"}


def test_the_sweep_regularises_where_a_loose_fit_overfits():
    # 25% of the train labels are flipped: an almost unregularised fit learns the flips and loses on clean test rows.
    rng = np.random.default_rng(0)
    means = np.zeros((4, 32))
    means[np.arange(4), np.arange(4)] = 3.0
    train_x, train_y = _clusters(means, 40, rng)
    test_x, test_y = _clusters(means, 100, rng)
    flipped = rng.random(len(train_y)) < 0.25
    train_y = np.where(flipped, rng.integers(0, 4, len(train_y)), train_y)

    result = linear_probe(train_x, train_y, test_x, test_y)
    assert result.c < max(DEFAULT_C_GRID)
    assert result.sweep[result.c] > result.sweep[max(DEFAULT_C_GRID)]
    loose = LogisticRegression(C=max(DEFAULT_C_GRID), max_iter=1000).fit(train_x, train_y).score(test_x, test_y)
    assert result.top1 > loose + 0.15, (result.top1, loose)


def test_binary_search_refines_c_to_an_eighth_of_a_decade():
    result = linear_probe(*_split_pair(0.15 * np.random.default_rng(0).normal(size=(6, 32)), 30, 30, seed=1))
    assert set(DEFAULT_C_GRID) <= set(result.sweep) and len(result.sweep) <= len(DEFAULT_C_GRID) + 8
    steps = sorted(abs(math.log10(c / result.c)) for c in result.sweep if c != result.c)
    assert steps[0] == pytest.approx(1 / 8)
    coarse = linear_probe(*_split_pair(0.15 * np.random.default_rng(0).normal(size=(6, 32)), 30, 30, seed=1),
                          steps_per_decade=0)
    assert sorted(coarse.sweep) == sorted(DEFAULT_C_GRID)


def test_the_refit_equals_scikit_learn_called_directly():
    # Labels that are not 0..C-1 go through the probe's own mapping; scikit-learn sorts them the same way.
    train_x, train_y, test_x, test_y = _split_pair(0.4 * np.random.default_rng(2).normal(size=(8, 24)), 40, 40, seed=3)
    values = np.array([3, 10, 42, 7, 99, 0, 5, 64])
    train_y, test_y = values[train_y], values[test_y]
    result = linear_probe(train_x, train_y, test_x, test_y)

    direct = LogisticRegression(C=result.c, max_iter=1000).fit(train_x, train_y)
    predicted = direct.predict(test_x)
    assert 0.4 < result.top1 < 0.95 and result.top5 < 1.0  # neither trivial nor hopeless (chance: 0.125)
    assert result.top1 == pytest.approx(np.mean(predicted == test_y), abs=1e-6)
    assert result.mean_per_class_recall == pytest.approx(balanced_accuracy_score(test_y, predicted), abs=1e-6)
    top5 = top_k_accuracy_score(test_y, direct.predict_proba(test_x), k=5, labels=direct.classes_)
    assert result.top5 == pytest.approx(top5, abs=1e-6)
    assert result.val_top1 == result.sweep[result.c] and 0 < result.val_top1 <= 1


def test_few_shot_indices_take_k_rows_per_class_deterministically(caplog):
    labels = np.repeat(np.array([5, 1, 8]), [10, 12, 2])
    picked = few_shot_indices(labels, 4, seed=0)
    counts = dict(zip(*np.unique(labels[picked], return_counts=True)))
    assert counts == {1: 4, 5: 4, 8: 2}  # class 8 has only 2 rows and keeps both
    assert "1 classes have fewer rows" in caplog.text and "8 (2)" in caplog.text
    assert np.array_equal(picked, few_shot_indices(labels, 4, seed=0))
    assert not np.array_equal(picked, few_shot_indices(labels, 4, seed=1))
    assert list(picked) == sorted(set(picked))
    assert len(few_shot_indices(labels, 1, seed=0)) == 3
    with pytest.raises(ValueError, match="shots=0"):
        few_shot_indices(labels, 0)


def test_k_shot_probes_sweep_inside_the_k_examples_and_one_shot_falls_back():
    data = _split_pair(0.8 * np.random.default_rng(4).normal(size=(5, 16)), 30, 20, seed=5)
    four = linear_probe(*data, shots=4, seed=0)
    assert (four.train_count, four.val_count) == (20, 5)  # one of each class's four held out for the sweep
    assert four.sweep and 0.6 < four.top1
    assert linear_probe(*data, shots=4, seed=0) == four
    other_draw = linear_probe(*data, shots=4, seed=1)
    assert other_draw.train_count == 20 and other_draw.top1 != four.top1
    everything = linear_probe(*data)
    assert everything.train_count == 150 and everything.top1 > four.top1

    one = linear_probe(*data, shots=1)
    assert (one.train_count, one.val_count, one.c, one.sweep) == (5, 0, FALLBACK_C, {})
    assert math.isnan(one.val_top1)
    assert 0.4 < one.top1 < four.top1  # one example per class beats chance (0.2), four beat one


def test_bad_input_names_the_culprit():
    train_x, train_y, test_x, test_y = _split_pair(np.eye(3, 8), 5, 5, seed=0)
    with pytest.raises(ValueError, match="train_labels: 14 labels for 15 feature rows"):
        linear_probe(train_x, train_y[:-1], test_x, test_y)
    with pytest.raises(ValueError, match="test_features have 7 dimensions|train_features have 8 dimensions"):
        linear_probe(train_x, train_y, test_x[:, :7], test_y)
    with pytest.raises(ValueError, match="train_labels: every row is class 0"):
        linear_probe(train_x, np.zeros_like(train_y), test_x, test_y)
    with pytest.raises(ValueError, match="test_labels: every row is class 2"):
        linear_probe(train_x, train_y, test_x, np.full_like(test_y, 2))
    poisoned = train_x.copy()
    poisoned[3, 1] = np.nan
    with pytest.raises(ValueError, match="train_features: 1 rows hold NaN.*row 3"):
        linear_probe(poisoned, train_y, test_x, test_y)
    with pytest.raises(ValueError, match="shots=0"):
        linear_probe(train_x, train_y, test_x, test_y, shots=0)
    with pytest.raises(ValueError, match="test_labels: expected .* integer labels"):
        linear_probe(train_x, train_y, test_x, test_y.astype(float))
    with pytest.raises(ValueError, match=r"test_labels: labels run from 1 to 3, outside 0..2 \(num_classes=3\)"):
        linear_probe(train_x, train_y, test_x, test_y + 1, num_classes=3)
    assert linear_probe(train_x, train_y, test_x, test_y, num_classes=10).num_classes == 10  # the set's full count
    with pytest.raises(ValueError, match="c_grid"):
        linear_probe(train_x, train_y, test_x, test_y, c_grid=(1.0, -1.0))


def _photo_feature(path) -> np.ndarray:
    """A fixed, cheap feature: a 4x4 thumbnail (mean brightness removed) beside a 64-bin colour histogram."""
    image = Image.open(path).convert("RGB")
    thumbnail = np.asarray(image.resize((4, 4), Image.BILINEAR), dtype=np.float64).ravel() / 255
    thumbnail -= thumbnail.mean()
    bins = np.asarray(image, dtype=np.int64) // 64
    histogram = np.bincount((bins[..., 0] * 16 + bins[..., 1] * 4 + bins[..., 2]).ravel(), minlength=64)
    colour = np.sqrt(histogram / histogram.sum())
    return np.concatenate([thumbnail / np.linalg.norm(thumbnail), colour])


@pytest.mark.shared_data
def test_probe_on_real_cifar10_photos_beats_chance(cifar10_dir, caplog):
    classes = sorted(p.name for p in cifar10_dir.iterdir() if p.is_dir())
    paths = [path for name in classes for path in sorted((cifar10_dir / name).glob("*.jpg"))[:60]]
    assert len(classes) == 10 and len(paths) == 600
    features = _unit_rows(np.stack([_photo_feature(path) for path in paths]))
    labels = np.repeat(np.arange(10), 60)
    train = np.arange(len(labels)) % 2 == 0  # a fixed stratified half: 30 photos of each class each side

    with caplog.at_level(logging.WARNING):
        result = linear_probe(features[train], labels[train], features[~train], labels[~train])
    # Chance is 0.10; guessing would reach 0.25 on 300 photos with odds below 1e-6.
    assert result.top1 > 0.25, result
    assert result.mean_per_class_recall == pytest.approx(result.top1, abs=1e-6)  # a balanced test split
    assert result.top5 > result.top1 and result.unconverged_fits == 0
    assert "stopped at max_iter" not in caplog.text
