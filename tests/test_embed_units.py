"""The pieces of `clip-ray embed` and `clip-ray search` without Ray: top-k against numpy, embedding files,
which partitions a re-run redoes, model sources, partitions of an ImageFolder, the encoder in-process."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from clip_ray.cli import build_parser
from clip_ray.cli.embed import embed_config_from_args
from clip_ray.config import ConfigError, EmbedConfig, SourceConfig, to_dict
from clip_ray.data.formats import FailureCounts
from clip_ray.data.offline.partitions import Partition
from clip_ray.driver.embed import finished_partitions, fingerprint
from clip_ray.inference.embedding_files import (
    FORMAT, PAIR_COLUMNS, clean_output_folder, embedding_schema, part_name, read_metadata, write_embedding_file,
)
from clip_ray.inference.encoder import ClipEncoder
from clip_ray.inference.models import ModelSourceError, resolve_model
from clip_ray.inference.partitions import EmbedPartition, partition_samples, plan_embed_partitions
from clip_ray.inference.pipeline import PartitionAssembler
from clip_ray.inference.search import EmbeddingSet, SearchError, exact_top_k, search
from clip_ray.model import build_model
from clip_ray.model.tokenizer import train_bpe_tokenizer

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(queries: np.ndarray, matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ matrix.T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, rows, axis=1), rows


# --------------------------------------------------------------------------- exact top-k


@pytest.mark.parametrize("chunk", [1, 37, 1000, 5000])
def test_exact_top_k_equals_numpy_brute_force(chunk):
    rng = np.random.default_rng(chunk)
    matrix, queries = unit_rows(rng, 1000, 16), unit_rows(rng, 5, 16)
    chunks = ((start, matrix[start:start + chunk]) for start in range(0, len(matrix), chunk))
    scores, rows = exact_top_k(queries, chunks, k=7, device="cpu")
    expected_scores, expected_rows = brute_force(queries, matrix, 7)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-5)


def test_exact_top_k_with_fewer_rows_than_k_pads_with_minus_one():
    rng = np.random.default_rng(0)
    matrix, queries = unit_rows(rng, 3, 8), unit_rows(rng, 2, 8)
    scores, rows = exact_top_k(queries, [(0, matrix[:2]), (2, matrix[2:])], k=5, device="cpu")
    np.testing.assert_array_equal(rows[:, :3], brute_force(queries, matrix, 3)[1])
    assert (rows[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()


# --------------------------------------------------------------------------- embedding files and search


def job_metadata(dim: int, model: str = "a" * 64, fingerprint_: str = "f") -> dict:
    return {"format": FORMAT, "towers": ["image", "text"], "dtype": "float16", "embed_dim": dim, "normalized": True,
            "fingerprint": fingerprint_, "counts": {"ok": 1},
            "model": {"config_sha256": model, "location": "/m", "version": {"step": 1},
                      "tokenizer": {"sha256": "t", "path": "/t", "given": None}}}


def write_part(folder, index: int, keys: list[str], images: np.ndarray, texts: np.ndarray, **metadata) -> None:
    meta = {**job_metadata(images.shape[1]), **metadata}
    schema = embedding_schema(PAIR_COLUMNS, ("image_embedding", "text_embedding"), images.shape[1], "float16", meta)
    write_embedding_file(str(folder / part_name(index)), schema, {
        "key": keys, "caption": [f"caption of {k}" for k in keys], "url": [None] * len(keys),
        "source": ["shard.tar"] * len(keys), "image_embedding": images, "text_embedding": texts})


def test_search_over_several_files_equals_numpy_and_names_each_row(tmp_path):
    rng = np.random.default_rng(1)
    sizes = [50, 0, 120, 31]
    matrices, keys = [], []
    for index, size in enumerate(sizes):
        part_keys = [f"p{index}_{i}" for i in range(size)]
        images = unit_rows(rng, size, 32)
        write_part(tmp_path, index, part_keys, images, unit_rows(rng, size, 32))
        matrices.append(images.astype(np.float16).astype(np.float32))  # what the file holds
        keys += part_keys
    files = EmbeddingSet.open(str(tmp_path))
    queries = unit_rows(rng, 4, 32)
    results = search(files, queries, k=9, device="cpu", chunk_rows=40)
    expected_scores, expected_rows = brute_force(queries, np.concatenate(matrices), 9)
    assert files.num_rows == sum(sizes) == len(keys)
    for hits, scores, rows in zip(results, expected_scores, expected_rows):
        assert [hit.key for hit in hits] == [keys[row] for row in rows]
        assert [hit.rank for hit in hits] == list(range(1, 10))
        np.testing.assert_allclose([hit.score for hit in hits], scores, atol=1e-5)
        assert all(hit.caption == f"caption of {hit.key}" and hit.url is None for hit in hits)


def test_files_of_different_models_are_not_searched_together(tmp_path):
    rng = np.random.default_rng(2)
    write_part(tmp_path, 0, ["a"], unit_rows(rng, 1, 8), unit_rows(rng, 1, 8))
    write_part(tmp_path, 1, ["b"], unit_rows(rng, 1, 8), unit_rows(rng, 1, 8),
               model={**job_metadata(8)["model"], "version": {"step": 2}})
    with pytest.raises(SearchError, match="different models"):
        EmbeddingSet.open(str(tmp_path))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(SearchError, match="not an embedding file"):
        EmbeddingSet.open(str(tmp_path / "other"))


def test_approximate_search_without_faiss_says_how_to_get_it(tmp_path, monkeypatch):
    import sys

    rng = np.random.default_rng(3)
    write_part(tmp_path, 0, ["a", "b"], unit_rows(rng, 2, 8), unit_rows(rng, 2, 8))
    monkeypatch.setitem(sys.modules, "faiss", None)  # an import of it fails, installed or not
    with pytest.raises(SearchError, match="pip install faiss-cpu"):
        search(EmbeddingSet.open(str(tmp_path)), unit_rows(rng, 1, 8), approximate=True)


def test_approximate_search_finds_what_exact_search_finds(tmp_path):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(3)
    write_part(tmp_path, 0, [str(i) for i in range(2000)], unit_rows(rng, 2000, 16), unit_rows(rng, 2000, 16))
    files = EmbeddingSet.open(str(tmp_path))
    queries = unit_rows(rng, 20, 16)
    exact = search(files, queries, k=5, device="cpu")
    index = str(tmp_path / "index.faiss")
    for _ in range(2):  # built, then reused from the file
        approximate = search(files, queries, k=5, approximate=True, index_path=index)
        found = sum(len({h.key for h in a} & {h.key for h in e}) for a, e in zip(approximate, exact))
        assert found / (20 * 5) >= 0.9


# --------------------------------------------------------------------------- resuming


def test_rerun_redoes_missing_and_stale_partitions_only(tmp_path):
    rng = np.random.default_rng(4)
    digests = {0: "d0", 1: "d1", 2: "d2", 3: "d3"}
    write_part(tmp_path, 0, ["a"], unit_rows(rng, 1, 8), unit_rows(rng, 1, 8), fingerprint="d0",
               counts={"ok": 1, "failed": {"corrupt_image": 2}})
    write_part(tmp_path, 1, ["b"], unit_rows(rng, 1, 8), unit_rows(rng, 1, 8), fingerprint="made by another model")
    (tmp_path / part_name(3)).write_bytes(b"PAR1 cut short")  # not readable: redone
    (tmp_path / (part_name(2) + ".tmp")).write_bytes(b"a crashed write")
    finished, stale = finished_partitions(str(tmp_path), digests)
    assert list(finished) == [0] and finished[0].failed == {"corrupt_image": 2}
    assert stale == 2
    # The run's cleanup: the crashed write's leftover, and part files of partitions the plan no longer has.
    (tmp_path / "notes.txt").write_text("not ours")
    assert clean_output_folder(str(tmp_path), keep={part_name(0), part_name(1)}) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", part_name(0), part_name(1)]


def test_fingerprint_follows_the_weights_and_the_partition_not_where_they_lie():
    def identity(location: str, weights: str) -> dict:
        return {"model": {"config_sha256": "c", "version": {"weights_sha256": weights}, "state_dict_options": {},
                          "tokenizer": {"sha256": "t"}, "location": location},
                "format": FORMAT, "towers": ["image"], "dtype": "float16", "precision": "auto", "preprocess": {},
                "input": {"source": {"path": "x", "format": "webdataset"}, "image_folder": None}}

    def partition(root: str, shard: str = "sub/00003.tar") -> EmbedPartition:
        return EmbedPartition(index=3, pairs=Partition(index=3, shard=f"{root}/{shard}"))

    here = fingerprint(identity("/a/ckpt", "w"), partition("/data/a"), "/data/a")
    assert fingerprint(identity("/elsewhere/ckpt", "w"), partition("/mnt/b"), "/mnt/b") == here
    assert fingerprint(identity("/a/ckpt", "other weights"), partition("/data/a"), "/data/a") != here
    assert fingerprint(identity("/a/ckpt", "w"), partition("/data/a", "sub/9.tar"), "/data/a") != here

    def folder(root: str) -> tuple[dict, EmbedPartition]:
        moved = {**identity("/a/ckpt", "w"), "input": {"source": None, "image_folder": root}}
        return moved, EmbedPartition(index=0, images=[(f"{root}/cat/1.jpg", "cat")], image_folder=root)

    assert fingerprint(*folder("/data/photos"), "/data/photos") == fingerprint(*folder("/mnt/p"), "/mnt/p")


def test_assembler_waits_for_every_row_and_drops_a_retried_tasks_repeats():
    assembler = PartitionAssembler(("key",), ("image_embedding",))

    def batch(partition: int, positions: list[int]) -> dict:
        return {"partition": np.full(len(positions), partition), "position": np.array(positions),
                "key": np.array([f"k{p}" for p in positions], dtype=object),
                "image_embedding": np.array([[p, p] for p in positions], dtype=np.float16)}

    def mixed(*batches: dict) -> dict:  # rows of several partitions in one block
        return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}

    assembler.add(batch(1, [2, 0]))
    assembler.add(mixed(batch(0, [0]), batch(1, [0])))  # position 0 of partition 1 again: a retried task
    assert assembler.complete() == []  # nothing reported yet
    assembler.expect({1: FailureCounts(ok=3).to_dict(), 0: FailureCounts(ok=1).to_dict(), 2: {"ok": 0}})
    assert sorted(assembler.complete()) == [0, 2]  # partition 1 still lacks position 1
    assembler.add(batch(1, [1]))
    columns, counts = assembler.pop(1)
    assert columns["key"].tolist() == ["k0", "k1", "k2"] and counts.ok == 3
    assert columns["image_embedding"].tolist() == [[0, 0], [1, 1], [2, 2]]
    empty, _ = assembler.pop(2)
    assert len(empty["key"]) == 0


# --------------------------------------------------------------------------- config and command line


def test_embed_config_checks_its_values():
    good = EmbedConfig(output="out", model="m", source=SourceConfig(path="shards"))
    good.validate()
    assert good.towers == ("image", "text")
    assert EmbedConfig(output="o", model="m", image_folder="f").towers == ("image",)
    for bad, key in [
        (dict(image_folder="f"), "embed.source"),  # both
        (dict(source=None, image_folder="f", embed="text"), "embed.embed"),
        (dict(num_gpus_per_actor=1.5), "embed.num_gpus_per_actor"),
        (dict(concurrency=0), "embed.concurrency"),
        (dict(dtype="int8"), "embed.dtype"),
        (dict(model=""), "embed.model"),
    ]:
        config = EmbedConfig(**{**dict(output="out", model="m", source=SourceConfig(path="shards")), **bad})
        with pytest.raises(ConfigError, match=key):
            config.validate()


def test_command_line_builds_the_config():
    args = build_parser().parse_args(["embed", "photos/", "out/", "--input-format", "imagefolder", "--model", "m.pt",
                                      "--num-gpus-per-actor", "0.25", "--concurrency", "4", "--dtype", "float32"])
    config = embed_config_from_args(args)
    assert (config.image_folder, config.source, config.towers) == ("photos/", None, ("image",))
    assert (config.num_gpus_per_actor, config.concurrency, config.dtype) == (0.25, 4, "float32")
    args = build_parser().parse_args(["embed", "d", "o", "--input-format", "csv", "--model", "m", "--embed", "text"])
    assert embed_config_from_args(args).source.format == "csv"


# --------------------------------------------------------------------------- model sources and the encoder


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    tokenizer = train_bpe_tokenizer(["a red circle", "a blue square on green"] * 5, vocab_size=300)
    torch.manual_seed(0)
    model = build_model("vit-tiny").eval()
    torch.save({"model_config": to_dict(model.config), "state_dict": model.state_dict()}, root / "model.pt")
    torch.save(model.state_dict(), root / "openai.pt")
    return {"root": root, "model": model, "tokenizer": tokenizer.save(root / "tokenizer.json")}


def test_a_model_file_needs_its_tokenizer_named(saved_model):
    with pytest.raises(ModelSourceError, match="--tokenizer"):
        resolve_model(str(saved_model["root"] / "model.pt"))
    with pytest.raises(ModelSourceError, match="no such file"):
        resolve_model(str(saved_model["root"] / "missing.pt"))
    resolved = resolve_model(str(saved_model["root"] / "model.pt"), tokenizer=str(saved_model["tokenizer"]))
    assert (resolved.kind, resolved.state_dict_options) == ("file", {})
    assert resolved.identity()["tokenizer"]["given"] == str(saved_model["tokenizer"])


def test_a_plain_state_dict_takes_its_activation_from_the_caller(saved_model):
    resolved = resolve_model(str(saved_model["root"] / "openai.pt"), tokenizer=str(saved_model["tokenizer"]),
                             activation="gelu")
    assert resolved.state_dict_options == {"activation": "gelu"} and resolved.model_config.activation == "gelu"
    assert resolved.load().config.activation == "gelu"


def test_encoder_in_process_equals_the_model(saved_model):
    resolved = resolve_model(str(saved_model["root"] / "model.pt"), tokenizer=str(saved_model["tokenizer"]))
    encoder = ClipEncoder(resolved, towers=("image", "text"), dtype="float32", device="cpu")
    pixels = np.random.default_rng(0).integers(0, 256, (3, 3, 64, 64), dtype=np.uint8)
    tokens = resolved.tokenizer(["a red circle", "a blue square", "green"], context_length=32).numpy()
    out = encoder({"image": pixels, "text": tokens, "key": np.array(["a", "b", "c"], dtype=object)})
    assert set(out) == {"key", "image_embedding", "text_embedding"}
    from clip_ray.data.stream.preprocess import normalize
    with torch.no_grad():
        images = saved_model["model"].encode_image(torch.from_numpy(normalize(pixels))).numpy()
        texts = saved_model["model"].encode_text(torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(out["image_embedding"], images, atol=1e-5)
    np.testing.assert_allclose(out["text_embedding"], texts, atol=1e-5)


# --------------------------------------------------------------------------- ImageFolder partitions


def test_image_folder_partitions_carry_labels_and_count_empty_files(tmp_path):
    for class_name, count in (("cat", 3), ("dog", 2)):
        (tmp_path / class_name).mkdir()
        for i in range(count):
            buffer = io.BytesIO()
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(buffer, format="JPEG")
            (tmp_path / class_name / f"{i}.jpg").write_bytes(buffer.getvalue())
    (tmp_path / "dog" / "empty.jpg").write_bytes(b"")
    config = EmbedConfig(output="o", model="m", image_folder=str(tmp_path), samples_per_partition=2)
    partitions = plan_embed_partitions(config, FailureCounts())
    assert [len(p.images) for p in partitions] == [2, 2, 2]
    assert EmbedPartition.from_json(partitions[1].to_json()) == partitions[1]
    counts = FailureCounts()
    rows = [row for p in partitions for _, row in partition_samples(p, None, counts)]
    assert [(row.key, row.label) for row in rows] == [("cat/0", "cat"), ("cat/1", "cat"), ("cat/2", "cat"),
                                                      ("dog/0", "dog"), ("dog/1", "dog")]
    assert counts.failed == {"zero_byte_image": 1} and counts.ok == 5
    assert json.loads(partitions[0].to_json())["image_folder"] == str(tmp_path)


def test_read_metadata_of_a_file_without_it_is_none(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": [1]}), tmp_path / "plain.parquet")
    assert read_metadata(str(tmp_path / "plain.parquet")) is None
