"""`clip-ray embed` and `clip-ray search` end to end, on a real local Ray cluster, drawn images and a saved model.

One embedding run (through the command line) and one partial re-run are shared by every
test here: the files must hold exactly what the model computes in this process, skip and
count the undecodable image, name the model, and be found again by search.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from embed_helpers import BROKEN_KEY, make_workspace

from clip_ray.cli import main
from clip_ray.config import EmbedConfig, SourceConfig
from clip_ray.data.formats import Sample
from clip_ray.data.stream.preprocess import Preprocessor, normalize
from clip_ray.driver.embed import embed
from clip_ray.inference.embedding_files import METADATA_KEY, STATS_FILE
from clip_ray.model.tokenizer import load_tokenizer

RAY_INIT_KWARGS = {"num_cpus": 2}
pytestmark = pytest.mark.usefixtures("ray_cluster")  # conftest: a local cluster for this module


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("embed"))


@pytest.fixture(scope="module")
def embedded(workspace, ray_cluster):
    """The first run through the CLI (the model by its run directory, the tokenizer from its run config), then
    the same job again from the library; what each reported, and the files' modification times after the first.
    (Which partitions a re-run redoes when some are missing or stale: tests/test_embed_units.py.)"""
    out = workspace.root / "embeddings"
    status = main(["embed", str(workspace.shards), str(out), "--model", str(workspace.run_dir),
                   "--batch-size", "4", "--concurrency", "1", "--progress-every-s", "1"])
    first = json.loads((out / STATS_FILE).read_text())
    mtimes = {path.name: path.stat().st_mtime_ns for path in out.glob("part-*.parquet")}
    config = EmbedConfig(output=str(out), model=str(workspace.run_dir), source=SourceConfig(path=str(workspace.shards)),
                         batch_size=4)
    second = embed(config)
    return {"status": status, "first": first, "second": second, "out": out, "mtimes": mtimes}


def read_part(path) -> tuple[pa.Table, dict]:
    table = pq.read_table(path)
    return table, json.loads(table.schema.metadata[METADATA_KEY])


def vectors(table: pa.Table, column: str) -> np.ndarray:
    return np.stack(table.column(column).to_numpy(zero_copy_only=False))


def test_first_run_writes_a_file_per_shard_and_counts_the_broken_image(embedded, workspace):
    first = embedded["first"]
    assert embedded["status"] == 0
    assert sorted(embedded["mtimes"]) == ["part-00000.parquet", "part-00001.parquet"]
    assert first["rows_written"] == len(workspace.samples) == 12
    assert first["partitions_written"] == 2 and first["partitions_reused"] == 0
    assert sum(first["failures"].values()) == 1 and set(first["failures"]) <= {"corrupt_image", "truncated_image"}
    assert any(BROKEN_KEY in example for examples in first["failure_examples"].values() for example in examples)
    files = sorted(embedded["out"].glob("part-*.parquet"))
    keys = [key for path in files for key in pq.read_table(path)["key"].to_pylist()]
    assert keys == list(workspace.samples)  # input order, the broken sample gone


def test_rerun_skips_finished_partitions(embedded):
    second, out = embedded["second"], embedded["out"]
    assert second["partitions_reused"] == 2 and second["partitions_written"] == 0
    assert second["rows_written"] == 12 and second["rows_embedded_now"] == 0
    assert sum(second["failures"].values()) == 1  # the reused files' counts are still in the total
    assert {path.name: path.stat().st_mtime_ns for path in out.glob("part-*.parquet")} == embedded["mtimes"]
    assert not list(out.glob("*.tmp"))


def test_embeddings_equal_the_model_in_process(embedded, workspace):
    """Each stored row is the in-process model's unit vector for the same image and caption, to float16's rounding."""
    tokenizer = load_tokenizer(workspace.tokenizer, workspace.model.config.text.context_length)
    prepare = Preprocessor(64, workspace.model.config.text.context_length, tokenizer, train=False)
    for path in sorted(embedded["out"].glob("part-*.parquet")):
        table, _ = read_part(path)
        keys = table["key"].to_pylist()
        pixels = np.stack([prepare.image(Sample(key=k, image=workspace.samples[k][0], caption="")) for k in keys])
        with torch.no_grad():
            images = workspace.model.encode_image(torch.from_numpy(normalize(pixels.transpose(0, 3, 1, 2))))
            texts = workspace.model.encode_text(torch.from_numpy(prepare.text([workspace.samples[k][1] for k in keys])))
        assert table["caption"].to_pylist() == [workspace.samples[k][1] for k in keys]
        assert table.schema.field("image_embedding").type == pa.list_(pa.float16(), 128)
        stored_images, stored_texts = vectors(table, "image_embedding"), vectors(table, "text_embedding")
        np.testing.assert_allclose(stored_images.astype(np.float32), images.numpy(), atol=2e-3, rtol=0)
        np.testing.assert_allclose(stored_texts.astype(np.float32), texts.numpy(), atol=2e-3, rtol=0)
        np.testing.assert_allclose(np.linalg.norm(stored_images.astype(np.float32), axis=1), 1, atol=2e-3)


def test_files_name_the_model(embedded, workspace):
    table, metadata = read_part(embedded["out"] / "part-00000.parquet")
    model = metadata["model"]
    assert model["kind"] == "checkpoint" and model["location"] == str(workspace.checkpoint)
    assert model["source"] == str(workspace.run_dir) and model["version"]["step"] == 3
    assert len(model["version"]["weights_sha256"]) == 64 and len(model["config_sha256"]) == 64
    assert model["name"] == "vit-tiny" and model["embed_dim"] == 128
    assert model["tokenizer"]["path"] == str(workspace.tokenizer) and model["tokenizer"]["given"] is None
    assert metadata["dtype"] == "float16" and metadata["normalized"] is True
    assert metadata["towers"] == ["image", "text"] and metadata["partition"]["index"] == 0
    assert table["url"].to_pylist()[0] == "https://example.com/s0_00.jpg"


def search_json(capsys, *args) -> list[dict]:
    capsys.readouterr()
    assert main(["search", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_search_finds_an_item_by_its_own_caption_and_its_own_image(embedded, workspace, capsys, tmp_path):
    key = "s1_03"
    image_path = tmp_path / "query.jpg"
    image_path.write_bytes(workspace.samples[key][0])
    out = str(embedded["out"])
    by_caption = search_json(capsys, out, "--text", workspace.samples[key][1], "--against", "text", "-k", "3")
    by_image = search_json(capsys, out, "--image", str(image_path), "-k", "3")
    for result in (by_caption, by_image):
        top = result[0]["hits"][0]
        assert (top["rank"], top["key"]) == (1, key)
        assert top["score"] == pytest.approx(1.0, abs=3e-3)
        assert top["caption"] == workspace.samples[key][1] and top["source"].endswith("00001.tar")
    capsys.readouterr()
    assert main(["search", os.path.join(out, "part-*.parquet"), "--text", "a red star", "-k", "2"]) == 0
    printed = capsys.readouterr().out
    assert "12 rows in 2 file(s), image_embedding, exact" in printed and "https://example.com/" in printed
    # --distinct: one hit per value of the column (here the 2 shards), each the best row of its shard.
    per_shard = search_json(capsys, out, "--text", "a red star", "-k", "3", "--distinct", "source")[0]["hits"]
    everything = search_json(capsys, out, "--text", "a red star", "-k", "12")[0]["hits"]
    best = {}
    for hit in everything:
        best.setdefault(hit["source"], hit["key"])
    assert [hit["key"] for hit in per_shard] == list(best.values())


def test_search_refuses_a_model_of_another_architecture(embedded, workspace, tmp_path, capsys):
    from clip_ray.config import to_dict
    from clip_ray.model import build_model

    other, model = tmp_path / "other.pt", build_model("rn-tiny")
    torch.save({"model_config": to_dict(model.config), "state_dict": model.state_dict()}, other)
    capsys.readouterr()
    status = main(["search", str(embedded["out"]), "--text", "x", "--model", str(other),
                   "--tokenizer", str(workspace.tokenizer)])
    assert status == 2 and "not the architecture" in capsys.readouterr().err
