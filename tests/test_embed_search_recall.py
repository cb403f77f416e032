"""`clip-ray embed` then search retrieves Flickr8k test photos exactly as the in-memory retrieval evaluation does.

A small CLIP trained for 150 steps on 512 Flickr8k train photos embeds the first 200 test
photos and their 1,000 captions (a caption-table input, three partitions) through the real Ray
Data path, in float32. Search (what `clip-ray search` calls) then answers every caption against
image_embedding, one result per photo, and every photo's stored vector against text_embedding,
k=10. R@1/5/10 in both directions must equal, to the last digit, retrieval_recall over the same
model's features computed in this process. (Measured: R@1/5/10 0.015/0.055/0.11 image to text,
0.015/0.061/0.141 text to image.) Also here: the top-k of distinct items against numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flickr_embed_helpers import caption_folder, train_small_clip

from clip_ray.cli import main
from clip_ray.data.formats import Sample
from clip_ray.data.stream.preprocess import Preprocessor, normalize
from clip_ray.eval.retrieval import retrieval_recall
from clip_ray.inference.search import EmbeddingSet, embed_queries, exact_top_k, query_model, search
from clip_ray.model.tokenizer import load_tokenizer

RAY_INIT_KWARGS = {"num_cpus": 2}
PHOTOS = 200
KS = (1, 5, 10)


@pytest.fixture(scope="module")
def small_clip(flickr8k_dir, tmp_path_factory, one_intra_op_thread):
    return train_small_clip(flickr8k_dir, tmp_path_factory.mktemp("small-clip"))


@pytest.fixture(scope="module")
def embedded(flickr8k_dir, small_clip, tmp_path_factory, ray_cluster):
    """The 200 photos' caption table embedded by the CLI in float32: (input rows (image, caption), output folder)."""
    root = tmp_path_factory.mktemp("flickr-embed")
    folder, rows = caption_folder(flickr8k_dir, root / "flickr8k-test-200", "test", PHOTOS)
    out = root / "embeddings"
    status = main(["embed", str(folder), str(out), "--input-format", "csv", "--model", str(small_clip.run_dir),
                   "--dtype", "float32", "--samples-per-partition", "400", "--batch-size", "128"])
    assert status == 0
    return rows, out


@pytest.fixture(scope="module")
def in_memory(embedded, small_clip, flickr8k_dir):
    """The model's features computed in this process: photo names, image [200, D] and caption [1000, D]
    features, each caption's photo number."""
    rows, _ = embedded
    names = list(dict.fromkeys(image for image, _ in rows))
    owner = torch.tensor([names.index(image) for image, _ in rows])
    config = small_clip.model.config
    tokenizer = load_tokenizer(small_clip.tokenizer, config.text.context_length)
    prepare = Preprocessor(config.vision.image_size, config.text.context_length, tokenizer, train=False)
    pixels = np.stack([prepare.image(Sample(key=name, image=(flickr8k_dir / "images" / name).read_bytes(),
                                            caption="")) for name in names])
    with torch.no_grad():
        images = small_clip.model.encode_image(torch.from_numpy(normalize(pixels.transpose(0, 3, 1, 2))))
        texts = small_clip.model.encode_text(torch.from_numpy(prepare.text([caption for _, caption in rows])))
    return {"names": names, "images": images, "texts": texts, "owner": owner}


def boundary_gap(similarities: torch.Tensor, own: torch.Tensor) -> float:
    """The smallest distance between a query's best own score and the k-th best other score, for k in KS:
    how far the features may move before some query crosses a k."""
    best_own = similarities.masked_fill(~own, -torch.inf).max(dim=1).values
    others = similarities.masked_fill(own, -torch.inf).topk(max(KS), dim=1).values
    return min((best_own - others[:, k - 1]).abs().min().item() for k in KS)


def photo_name(source: str) -> str:
    return source.rsplit("/", 1)[-1]


def test_search_recall_equals_the_in_memory_evaluation(embedded, in_memory):
    rows, out = embedded
    names, owner, images, texts = (in_memory[name] for name in ("names", "owner", "images", "texts"))
    files = EmbeddingSet.open(str(out))
    assert len(files.files) == 3 and files.num_rows == len(rows) == 5 * PHOTOS
    assert files.metadata[0]["dtype"] == "float32"
    stored_images = np.concatenate([vectors for _, vectors in files.chunks("image_embedding")])
    stored_texts = np.concatenate([vectors for _, vectors in files.chunks("text_embedding")])
    first_rows = [[image for image, _ in rows].index(name) for name in names]  # one row per photo

    # The files hold the in-process features to float32's last bits, and no query of the reference is
    # anywhere near that close to crossing a k: equal R@k below is not luck, and it is stable.
    np.testing.assert_allclose(stored_images[first_rows], images.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(stored_texts, texts.numpy(), rtol=0, atol=1e-6)
    is_own = owner.unsqueeze(1) == torch.arange(len(names)).unsqueeze(0)  # [captions, photos]
    assert min(boundary_gap(texts @ images.T, is_own), boundary_gap(images @ texts.T, is_own.T)) > 1e-5

    # Every caption as a text query, embedded as `clip-ray search --text` does; one hit per photo.
    queries = embed_queries(query_model(files), texts=[caption for _, caption in rows], device="cpu")
    by_caption = search(files, queries, k=max(KS), against="image", device="cpu", distinct="source")
    assert all(len({hit.source for hit in hits}) == max(KS) for hits in by_caption)
    caption_ranks = [min((hit.rank for hit in hits if photo_name(hit.source) == image), default=None)
                     for (image, _), hits in zip(rows, by_caption)]
    # Every photo's stored vector against the captions: its rank is its best caption's.
    by_image = search(files, stored_images[first_rows], k=max(KS), against="text", device="cpu")
    photo_ranks = [min((hit.rank for hit in hits if photo_name(hit.source) == name), default=None)
                   for name, hits in zip(names, by_image)]

    measured = {}
    for k in KS:
        measured[f"text_to_image_R@{k}"] = sum(rank is not None and rank <= k for rank in caption_ranks) / len(rows)
        measured[f"image_to_text_R@{k}"] = sum(rank is not None and rank <= k for rank in photo_ranks) / len(names)
    reference = retrieval_recall(images, texts, owner, ks=KS)
    print("R@k from embed + search:", measured)
    print("R@k in memory:          ", reference)
    # retrieval_recall's fractions are float32 means: the same count over the same total is the same float32.
    assert {name: torch.tensor(value).item() for name, value in measured.items()} == reference
    assert reference["text_to_image_R@10"] > 2 * 10 / PHOTOS  # twice chance: the features are not noise


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_distinct_search_keeps_each_groups_best_row(chunk, one_intra_op_thread):
    rng = np.random.default_rng(chunk)
    matrix = rng.standard_normal((300, 16)).astype(np.float32)
    queries = rng.standard_normal((9, 16)).astype(np.float32)
    groups = np.repeat(rng.permutation(80), rng.integers(1, 7, 80))[:300]  # runs of rows, as a caption table has
    groups = np.concatenate([groups, np.arange(1000, 1000 + 300 - len(groups))])
    chunks = ((start, matrix[start:start + chunk]) for start in range(0, len(matrix), chunk))
    scores, rows = exact_top_k(queries, chunks, k=10, device="cpu", groups=groups)
    for query, got_scores, got_rows in zip(queries, scores, rows):
        all_scores = matrix @ query
        best = {}
        for row in np.argsort(-all_scores, kind="stable"):
            best.setdefault(groups[row], row)
        expected = list(best.values())[:10]
        assert got_rows.tolist() == expected
        np.testing.assert_allclose(got_scores, all_scores[expected], atol=1e-5)
