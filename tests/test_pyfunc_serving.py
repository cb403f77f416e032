"""Issue #14, 5: the model a run logs is a python_function model that serves its embeddings.

A tiny random CLIP is logged the way training logs it (Tracker.log_model into a real SQLite store,
registered under tracking.register_as); then mlflow.pyfunc.load_model, `mlflow models serve` on
127.0.0.1, MLflow's pytorch loader and clip-ray's own loader all give the embeddings the model itself
gives on real Flickr8k photos (as JPEG bytes, base64 strings and preprocessed pixels) and captions.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from flickr_embed_helpers import flickr_captions, split_names
from local_cluster import free_ports
from repo_paths import REPO_ROOT
from mlflow.exceptions import MlflowException

from clip_ray.config import ModelConfig, TextConfig, TrackingConfig, VisionConfig
from clip_ray.data.formats import Sample
from clip_ray.data.formats.samples import FailureCounts
from clip_ray.data.stream.preprocess import Preprocessor
from clip_ray.model import build_model
from clip_ray.model.tokenizer import train_bpe_tokenizer
from clip_ray.tracking.export import process_tracking_uri
from clip_ray.tracking.tracker import Tracker
from clip_ray.worker.loop import _failure_metrics

IMAGE_SIZE = 48  # the photos are 128 x 128: resizing and the centre crop are exercised
REGISTERED = "tiny-clip-serving"
PHOTOS = 6
ATOL = 1e-5


def tiny_config(vocab_size: int) -> ModelConfig:
    return ModelConfig(embed_dim=32, text=TextConfig(context_length=24, vocab_size=vocab_size, width=32, layers=2,
                                                     head_width=16),
                       vision=VisionConfig(image_size=IMAGE_SIZE, patch_size=8, width=32, layers=2, head_width=16))


@pytest.fixture(scope="module")
def logged(tmp_path_factory, flickr8k_dir):
    """A tiny CLIP logged and registered as training does, its photos, captions and expected embeddings."""
    root = tmp_path_factory.mktemp("pyfunc")
    table = flickr_captions(flickr8k_dir)
    names = split_names(flickr8k_dir, "test", PHOTOS)
    captions = [table[name][0] for name in names]
    photos = [(flickr8k_dir / "images" / name).read_bytes() for name in names]
    train_captions = [c for name in split_names(flickr8k_dir, "train", 200) for c in table[name]]
    tokenizer = train_bpe_tokenizer(train_captions, vocab_size=600, context_length=24)
    tokenizer_path = tokenizer.save(root)

    torch.manual_seed(0)
    model = build_model(tiny_config(tokenizer.vocab_size)).eval()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    config = TrackingConfig(tracking_uri=uri, experiment="serving", run_name="tiny", register_as=REGISTERED,
                            log_system_metrics=False)
    tracker = Tracker(config, {"model": "tiny"}, flush_interval_s=0.2)
    example = (torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE), tokenizer(["a photo", "a dog"]))
    tracker.log_model(model, example, tokenizer_path=tokenizer_path)
    assert tracker.flush(timeout_s=240), "the model should reach a local store"
    tracker.close()
    assert tracker.model_uri and str(tracker.model_version) == "1"

    # What the model itself gives, preprocessed as the evaluation preprocesses (clip_ray.eval).
    preprocess = Preprocessor(IMAGE_SIZE, 24, tokenizer, train=False)
    batch = preprocess.batch([Sample(key=n, image=p, caption=c) for n, p, c in zip(names, photos, captions)],
                             FailureCounts())
    with torch.no_grad():
        image_embeddings = model.encode_image(torch.from_numpy(batch["image"])).numpy()
        text_embeddings = model.encode_text(torch.from_numpy(batch["text"])).numpy()
    # Different photos must embed apart by far more than the tolerance, or equality would prove nothing.
    assert np.abs(image_embeddings[0] - image_embeddings[1]).max() > 100 * ATOL
    return {"uri": uri, "model_uri": tracker.model_uri, "run_id": tracker.run_id, "model": model,
            "photos": photos, "captions": captions, "pixels": batch["image"],
            "image_embeddings": image_embeddings, "text_embeddings": text_embeddings}


def stacked(column: pd.Series) -> np.ndarray:
    return np.stack([np.asarray(value, dtype=np.float32) for value in column])


def test_the_logged_model_is_a_pyfunc_model_that_embeds_photos_and_captions(logged):
    images, texts = logged["image_embeddings"], logged["text_embeddings"]
    with process_tracking_uri(logged["uri"]):
        info = mlflow.models.get_model_info(logged["model_uri"])
        registered = mlflow.models.get_model_info(f"models:/{REGISTERED}/1")
        pyfunc = mlflow.pyfunc.load_model(logged["model_uri"])
    assert {"python_function", "pytorch"} <= set(info.flavors)
    assert info.flavors["python_function"]["loader_module"] == "clip_ray.tracking.pyfunc"
    assert "python_function" in registered.flavors and registered.model_id == info.model_id
    assert info.metadata["tokenizer"] == "clip/tokenizer.json"
    assert {spec.name for spec in info.signature.inputs.inputs} == {"image", "pixels", "text"}
    assert info.saved_input_example_info["type"] == "dataframe"

    # Encoded photos and captions, row by row.
    out = pyfunc.predict(pd.DataFrame({"image": logged["photos"], "text": logged["captions"]}))
    assert list(out.columns) == ["image_embedding", "text_embedding"] and len(out) == PHOTOS
    np.testing.assert_allclose(stacked(out["image_embedding"]), images, atol=ATOL, rtol=0)
    np.testing.assert_allclose(stacked(out["text_embedding"]), texts, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(stacked(out["image_embedding"]), axis=1), 1.0, atol=1e-5)

    # Rows with only one of them, base64 strings as JSON carries them, and preprocessed pixels.
    b64 = [base64.b64encode(photo).decode("ascii") for photo in logged["photos"]]
    mixed = pd.DataFrame({"image": [b64[0], None, b64[2]], "text": [None, logged["captions"][1], None]})
    out = pyfunc.predict(mixed)
    assert out["image_embedding"][1] is None and out["text_embedding"][0] is None
    np.testing.assert_allclose(stacked(out["image_embedding"][[0, 2]]), images[[0, 2]], atol=ATOL, rtol=0)
    np.testing.assert_allclose(out["text_embedding"][1], texts[1], atol=ATOL, rtol=0)
    out = pyfunc.predict({"text": logged["captions"][:2]})  # a dict of lists: a row per item
    np.testing.assert_allclose(stacked(out["text_embedding"]), texts[:2], atol=ATOL, rtol=0)
    out = pyfunc.predict({"pixels": list(logged["pixels"][:3])})
    assert list(out.columns) == ["image_embedding"]
    np.testing.assert_allclose(stacked(out["image_embedding"]), images[:3], atol=ATOL, rtol=0)

    # Bad input is refused with the row and the reason.
    with pytest.raises(MlflowException, match=r"row 1: 'image' is not a usable image \(not_an_image"):
        pyfunc.predict(pd.DataFrame({"image": [logged["photos"][0], b"plain text, not a JPEG"]}))
    with pytest.raises(MlflowException, match=r"row 0: 'pixels' has shape \(3, 8, 8\).*\(3, 48, 48\)"):
        pyfunc.predict({"pixels": [np.zeros((3, 8, 8))]})
    with pytest.raises(MlflowException, match=r"rows 1 have no image, pixels or text"):
        pyfunc.predict(pd.DataFrame({"image": [b64[0], None], "text": ["a dog", None]}))


def test_the_pytorch_flavor_and_clip_rays_own_loader_still_read_it(logged):
    from clip_ray.inference.models import resolve_model

    model, images = logged["model"], torch.from_numpy(logged["pixels"][:2])
    with process_tracking_uri(logged["uri"]):
        program = mlflow.pytorch.load_model(logged["model_uri"])
    with torch.no_grad():
        assert torch.allclose(program(images, torch.ones(2, 24, dtype=torch.long))[0], model.encode_image(images),
                              atol=ATOL, rtol=0)
    resolved = resolve_model(f"runs:/{logged['run_id']}", tracking_uri=logged["uri"])
    np.testing.assert_allclose(resolved.load().encode_image(images).numpy(), logged["image_embeddings"][:2],
                               atol=ATOL, rtol=0)


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mlflow_models_serve_answers_with_the_checkpoints_embeddings_on_loopback(logged, tmp_path):
    port = free_ports(1)[0]
    log = tmp_path / "serve.log"
    venv_bin = Path(sys.executable).parent  # the server runs `uvicorn` from PATH, as in an activated venv
    env = dict(os.environ, MLFLOW_TRACKING_URI=logged["uri"], PATH=f"{venv_bin}{os.pathsep}{os.environ['PATH']}")
    command = [str(venv_bin / "mlflow"), "models", "serve", "-m", f"models:/{REGISTERED}/1",
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with open(log, "wb") as out:
        server = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, f"mlflow models serve exited:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no /ping answer within 180 s:\n{log.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)

        b64 = [base64.b64encode(photo).decode("ascii") for photo in logged["photos"]]
        status, answer = post(f"{url}/invocations", {"dataframe_split": {
            "columns": ["image", "text"], "data": [list(row) for row in zip(b64, logged["captions"])]}})
        assert status == 200, answer
        rows = answer["predictions"]
        assert len(rows) == PHOTOS
        np.testing.assert_allclose(np.array([row["image_embedding"] for row in rows]), logged["image_embeddings"],
                                   atol=ATOL, rtol=0)
        np.testing.assert_allclose(np.array([row["text_embedding"] for row in rows]), logged["text_embeddings"],
                                   atol=ATOL, rtol=0)

        status, answer = post(f"{url}/invocations", {"dataframe_records": [{"text": c} for c in logged["captions"]]})
        assert status == 200, answer
        np.testing.assert_allclose(np.array([row["text_embedding"] for row in answer["predictions"]]),
                                   logged["text_embeddings"], atol=ATOL, rtol=0)

        status, answer = post(f"{url}/invocations", {"dataframe_records": [{"image": b64[0]}, {"image": "bm90IGFu"}]})
        assert status == 400 and "row 1: 'image' is not a usable image" in answer["message"], answer
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)  # its own session: the uvicorn worker goes too
        server.wait()


# Loads the model in a process where the installed clip-ray cannot be imported (its editable finder and the
# repository are off the import path): what a clean serving environment with the model's requirements has.
LOAD_WITHOUT_CLIP_RAY = textwrap.dedent("""
    import importlib.util, json, sys
    sys.meta_path = [finder for finder in sys.meta_path if "editable" not in repr(finder).lower()]
    sys.path = [entry for entry in sys.path if entry not in ("", sys.argv[3])]
    assert importlib.util.find_spec("clip_ray") is None, "clip_ray should not be importable here"
    import mlflow.pyfunc
    model = mlflow.pyfunc.load_model(sys.argv[1])
    import clip_ray
    out = model.predict({"text": json.loads(sys.argv[2])})
    print(json.dumps({"clip_ray": clip_ray.__file__, "text_embedding": [v.tolist() for v in out["text_embedding"]]}))
""")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_model_carries_the_code_it_needs(logged, tmp_path):
    env = dict(os.environ, MLFLOW_TRACKING_URI=logged["uri"])
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_CLIP_RAY, logged["model_uri"],
                           json.dumps(logged["captions"]), str(REPO_ROOT)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert f"{os.sep}code{os.sep}clip_ray{os.sep}" in answer["clip_ray"] and str(REPO_ROOT) not in answer["clip_ray"]
    np.testing.assert_allclose(np.array(answer["text_embedding"]), logged["text_embeddings"], atol=ATOL, rtol=0)


def test_failure_metrics_are_one_total_and_the_reasons_that_happened():
    assert _failure_metrics({"a": FailureCounts(ok=50)}) == {"data/failures": 0}
    assert _failure_metrics({}) == {"data/failures": 0}
    first = FailureCounts(ok=10, failed={"corrupt_image": 2})
    second = FailureCounts(ok=5, failed={"corrupt_image": 1, "unreadable_shard": 1})
    assert _failure_metrics({"a": first, "b": second}) == {
        "data/failures": 4, "data/corrupt_image": 3, "data/unreadable_shard": 1}


def test_a_logged_model_starts_a_run_through_init_from(logged, tmp_path):
    """model.init_from: runs:/ID/model gives the weights of its torch.export program, and a run that names no
    tokenizer takes the one inside the model (checked token for token against the weights' vocabulary)."""
    from clip_ray.config import load_config
    from clip_ray.driver.init_weights import prepare_initial_weights
    from clip_ray.model.initial_weights import read_prepared_weights

    model = logged["model"]
    arch = model.config
    sets = [f"model.init_from=runs:/{logged['run_id']}/model", f"model.embed_dim={arch.embed_dim}",
            *[f"model.vision.{k}={getattr(arch.vision, k)}" for k in ("image_size", "patch_size", "width", "layers",
                                                                       "head_width")],
            *[f"model.text.{k}={getattr(arch.text, k)}" for k in ("context_length", "vocab_size", "width", "layers",
                                                                   "head_width")],
            f"data.train=[{{path: '{tmp_path}'}}]", f"cluster.storage_path={tmp_path / 'storage'}",
            f"tracking.tracking_uri={logged['uri']}"]
    config = load_config(None, sets)
    assert config.data.tokenizer == ""
    prepare_initial_weights(config)
    assert config.tracking.tags["clip_ray.init_from.kind"] == "mlflow"
    assert config.data.tokenizer.startswith(str(tmp_path / "storage" / "tokenizers"))
    prepared = read_prepared_weights(config.model.init_from)
    expected = model.state_dict()
    assert set(prepared) == set(expected) and all(torch.equal(prepared[k], expected[k]) for k in expected)
