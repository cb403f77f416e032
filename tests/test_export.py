"""clip-ray export: a random tiny model out to OpenCLIP, transformers, ONNX and safetensors, loaded back by
each of them (open_clip, transformers.CLIPModel, onnxruntime, clip-ray) with the same embeddings; a ResNet
refused by the transformers export while the other formats are written; registration in an MLflow registry."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime
import open_clip
import pytest
import torch
import transformers
from mlflow import MlflowClient
from PIL import Image

from clip_ray.cli import main
from clip_ray.cli.export import FORMATS as CLI_FORMATS
from clip_ray.config import ModelConfig
from clip_ray.config.presets import get_preset
from clip_ray.data.stream.preprocess import center_square_box, normalize
from clip_ray.driver.export import FORMATS
from clip_ray.driver.export_tokenizer import write_transformers_tokenizer
from clip_ray.inference.init_source import read_initial_weights
from clip_ray.inference.models import resolve_model
from clip_ray.inference.safetensors_export import load_safetensors_export
from clip_ray.model import build_model
from clip_ray.model.tokenizer import CLIP_VOCAB_SIZE, ClipTokenizer, load_tokenizer, train_bpe_tokenizer
from clip_ray.tracking.export import process_tracking_uri
from clip_ray.worker.checkpoint import save_training_state

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

FEATURE_TOLERANCE = 2e-5  # unit-norm float32 features computed by another implementation
PHOTOS = 4
ODD_CAPTIONS = ["", "A  Dog's   day\tOUT!", "Man on an ATV catching air !", "the 3 dogs " * 40]


# --------------------------------------------------------------------------- inputs and models


@pytest.fixture(scope="module")
def photos(flickr8k_dir: Path) -> tuple[list[Path], list[str], list[str]]:
    """(image files, one caption per photo, every caption of the test split's first 200 photos)."""
    names = (flickr8k_dir / "splits" / "test.txt").read_text().split()[:200]
    captions: dict[str, list[str]] = {}
    with open(flickr8k_dir / "captions.csv", newline="") as file:
        for row in csv.DictReader(file):
            if row["image"] in names[:200]:
                captions.setdefault(row["image"], []).append(row["caption"])
    files = [flickr8k_dir / "images" / name for name in names[:PHOTOS]]
    return files, [captions[name][0] for name in names[:PHOTOS]], [c for name in names for c in captions[name]]


def pixels(files: list[Path], size: int) -> torch.Tensor:
    """clip-ray's evaluation preprocessing: the centre square, bicubic to size x size, CLIP's normalisation."""
    rows = []
    for path in files:
        with Image.open(path) as image:
            image = image.convert("RGB")
            rows.append(np.asarray(image.resize((size, size), Image.Resampling.BICUBIC,
                                                box=center_square_box(*image.size))).transpose(2, 0, 1))
    return torch.from_numpy(normalize(np.stack(rows)))


def save_checkpoint(config: ModelConfig, directory: Path, seed: int) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(seed)
    model = build_model(config).eval()
    with torch.no_grad():  # a temperature of its own, so a format that dropped it would show
        model.logit_scale.fill_(3.1)
    save_training_state(directory, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), step=7)
    return directory, model


@torch.no_grad()
def features(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return model.encode_image(images), model.encode_text(tokens)


def assert_close(actual, expected, what: str) -> None:
    actual = torch.as_tensor(np.asarray(actual)).float()
    difference = (actual - expected).abs().max().item()
    assert difference < FEATURE_TOLERANCE, f"{what}: max abs difference {difference:.3g}"


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


@pytest.fixture(scope="module")
def clip_merges() -> Path:
    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


@pytest.fixture(scope="module")
def vit_export(tmp_path_factory, photos, clip_merges):
    """A vit-tiny with CLIP's vocabulary, exported to every format and registered, in one command."""
    root = tmp_path_factory.mktemp("vit-export")
    config = get_preset("vit-tiny")
    config.text.vocab_size = CLIP_VOCAB_SIZE
    checkpoint, model = save_checkpoint(config, root / "checkpoint", seed=0)
    store = f"sqlite:///{root / 'mlflow.db'}"
    status = main(["export", str(checkpoint), "--to", "all", "--output", str(root / "out"), "--tokenizer",
                   str(clip_merges), "--register", "tiny-vit", "--tracking-uri", store,
                   "--json", str(root / "summary.json")])
    tokenizer = ClipTokenizer(clip_merges, config.text.context_length)
    files, captions, _ = photos
    images, tokens = pixels(files, config.vision.image_size), tokenizer(captions + ODD_CAPTIONS)
    return {"status": status, "checkpoint": checkpoint, "tokenizer_path": clip_merges, "out": root / "out",
            "store": store, "model": model, "tokenizer": tokenizer,
            "images": images, "files": files, "tokens": tokens, "captions": captions + ODD_CAPTIONS,
            "expected": features(model, images, tokens), "summary": json.loads((root / "summary.json").read_text())}


# --------------------------------------------------------------------------- the ViT, every format


def test_every_format_written_with_its_manifest(vit_export):
    assert vit_export["status"] == 0
    assert set(CLI_FORMATS) == set(FORMATS) == set(vit_export["summary"]["formats"])
    for fmt in FORMATS:
        folder = vit_export["out"] / fmt
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["format"] == fmt and manifest["model"]["kind"] == "checkpoint"
        assert manifest["model"]["version"]["step"] == 7
        for name, facts in manifest["files"].items():
            assert (folder / name).stat().st_size == facts["bytes"], name
        assert "## Loading" in (folder / "README.md").read_text()
    assert not [p for p in vit_export["out"].iterdir() if p.name.startswith(".")], "staging folder left behind"


def test_openclip_loads_it_with_equal_embeddings(vit_export):
    folder = vit_export["out"] / "openclip"
    model = open_clip.create_model(f"local-dir:{folder}").eval()
    expected_images, expected_texts = vit_export["expected"]
    with torch.no_grad():
        assert_close(model.encode_image(vit_export["images"], normalize=True), expected_images, "open_clip images")
        assert_close(model.encode_text(vit_export["tokens"], normalize=True), expected_texts, "open_clip texts")
        assert model.logit_scale.item() == pytest.approx(3.1)
    # OpenCLIP's own tokenizer for this folder gives clip-ray's ids.
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    assert torch.equal(tokenizer(vit_export["captions"]), vit_export["tokens"])
    # The by-name route: the plain config registered, the weights file as `pretrained`.
    name = json.loads((folder / "manifest.json").read_text())["open_clip_model_name"]
    open_clip.add_model_config(folder / f"{name}.json")
    by_name = open_clip.create_model(name, pretrained=str(folder / "open_clip_model.safetensors")).eval()
    with torch.no_grad():
        assert_close(by_name.encode_text(vit_export["tokens"], normalize=True), expected_texts, "open_clip by name")


def test_transformers_loads_it_with_equal_embeddings(vit_export):
    folder = vit_export["out"] / "hf"
    model = transformers.CLIPModel.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    length = vit_export["tokens"].shape[1]
    batch = tokenizer(vit_export["captions"], padding="max_length", max_length=length, truncation=True,
                      return_tensors="pt")
    # The same ids as clip-ray's up to the padding (transformers pads CLIP's BPE with the end token, clip-ray with 0).
    assert torch.equal(batch.input_ids.masked_fill(batch.attention_mask == 0, 0), vit_export["tokens"])
    expected_images, expected_texts = vit_export["expected"]
    with torch.no_grad():
        outputs = model(input_ids=batch.input_ids, pixel_values=vit_export["images"])
    assert_close(outputs.image_embeds, expected_images, "CLIPModel images")
    assert_close(outputs.text_embeds, expected_texts, "CLIPModel texts")
    assert model.logit_scale.item() == pytest.approx(3.1)
    # The image processor's preprocessing is clip-ray's up to its own resizing code.
    processor = transformers.CLIPProcessor.from_pretrained(folder)
    processed = processor(images=[Image.open(path).convert("RGB") for path in vit_export["files"]],
                              return_tensors="pt").pixel_values
    assert processed.shape == vit_export["images"].shape
    # Measured: at most one uint8 level apart (0.015 after normalising), a mean of 4e-6.
    assert (processed - vit_export["images"]).abs().max() < 0.05


def test_onnx_graphs_match_pytorch(vit_export):
    folder = vit_export["out"] / "onnx"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [c["file"] for c in manifest["checks"]] == ["image_encoder.onnx", "text_encoder.onnx"]
    assert all(c["max_abs_diff"] <= manifest["tolerance"] and c["opset"] >= 17 for c in manifest["checks"])
    expected_images, expected_texts = vit_export["expected"]
    images = onnxruntime.InferenceSession(str(folder / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    texts = onnxruntime.InferenceSession(str(folder / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    assert_close(images.run(None, {"images": vit_export["images"].numpy()})[0], expected_images, "ONNX images")
    assert_close(texts.run(None, {"tokens": vit_export["tokens"].numpy()})[0], expected_texts, "ONNX texts")
    # One row is a batch too (exported with a dynamic batch dimension).
    assert_close(images.run(None, {"images": vit_export["images"][:1].numpy()})[0], expected_images[:1], "ONNX 1 row")


def test_safetensors_folder_reads_back_into_clip_ray(vit_export):
    folder = vit_export["out"] / "safetensors"
    model, tokenizer = load_safetensors_export(folder), load_tokenizer(folder, 32)
    assert model.config.architecture() == vit_export["model"].config.architecture()
    assert torch.equal(tokenizer(vit_export["captions"]), vit_export["tokens"])
    images, texts = features(model, vit_export["images"], vit_export["tokens"])
    expected_images, expected_texts = vit_export["expected"]
    assert torch.equal(images, expected_images) and torch.equal(texts, expected_texts)
    # The folder is a model source like any other (clip-ray eval, embed, wise-ft), with its own tokenizer.
    resolved = resolve_model(str(folder))
    assert resolved.kind == "safetensors" and resolved.tokenizer_path.startswith(str(folder))
    images, texts = features(resolved.load(), vit_export["images"], vit_export["tokens"])
    assert torch.equal(images, expected_images) and torch.equal(texts, expected_texts)


def test_init_from_reads_the_safetensors_and_hf_exports(vit_export, tmp_path):
    """Training can start from either export (model.init_from) and gets the very weights that were exported."""
    expected = vit_export["model"].state_dict()
    for source, kind in ((vit_export["out"] / "safetensors" / "model.safetensors", "safetensors"),
                         (vit_export["out"] / "hf", "huggingface")):
        weights = read_initial_weights(str(source), None, tmp_path)
        assert weights.kind == kind
        assert weights.model_config.vision == vit_export["model"].config.vision, kind
        assert weights.model_config.activation == vit_export["model"].config.activation, kind
        assert sorted(weights.state_dict) == sorted(expected), kind
        assert all(torch.equal(weights.state_dict[name].float(), expected[name]) for name in expected), kind
        # What the tokenizer check of init_from goes by: the tokenizer file beside the weights, or HF's ids.
        if kind == "safetensors":
            assert weights.tokenizer.tokenizer_path == str(source.parent / "bpe_simple_vocab_16e6.txt.gz")
        else:
            assert weights.tokenizer.eot_token_id == vit_export["tokenizer"].eot_token_id


def test_registered_version_holds_the_files(vit_export, tmp_path):
    registered = vit_export["summary"]["registered"]
    assert registered["name"] == "tiny-vit" and registered["version"] == "1"
    client = MlflowClient(vit_export["store"])
    version = client.get_model_version("tiny-vit", "1")
    assert version.run_id == registered["run_id"]
    assert version.tags["clip_ray.formats"] == "openclip,hf,onnx,safetensors"
    assert json.loads(version.tags["clip_ray.weights"])["step"] == 7
    run = client.get_run(version.run_id)
    assert run.data.tags["mlflow.source.name"] == "clip-ray export"
    assert run.data.params["formats"] == "openclip,hf,onnx,safetensors"
    assert run.data.params["model.kind"] == "checkpoint"
    with process_tracking_uri(vit_export["store"]):  # models:/NAME/VERSION is looked up in the registry URI
        local = Path(mlflow.artifacts.download_artifacts("models:/tiny-vit/1", dst_path=str(tmp_path)))
    for fmt in FORMATS:
        exported = sorted(p.relative_to(vit_export["out"] / fmt) for p in (vit_export["out"] / fmt).rglob("*"))
        assert sorted(p.relative_to(local / fmt) for p in (local / fmt).rglob("*")) == exported, fmt
    assert (local / "onnx" / "image_encoder.onnx").read_bytes() == \
        (vit_export["out"] / "onnx" / "image_encoder.onnx").read_bytes()


# --------------------------------------------------------------------------- a trained tokenizer, a ResNet


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory, photos) -> Path:
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_bpe_tokenizer(photos[2], vocab_size=600, context_length=32).save(path)
    return path


def test_trained_tokenizer_hf_export_moves_the_end_token(tmp_path, photos, trained_tokenizer):
    """A trained tokenizer's end token is id 2, which CLIPModel reads as 'pool at argmax': the export moves it."""
    checkpoint, model = save_checkpoint(get_preset("vit-tiny"), tmp_path / "checkpoint", seed=1)
    # Written to a URI (staged locally, then copied by pyarrow): file:// here, s3:// or gs:// alike.
    assert main(["export", str(checkpoint), "--to", "hf", "--output", (tmp_path / "out").as_uri(),
                 "--tokenizer", str(trained_tokenizer)]) == 0
    tokenizer = load_tokenizer(trained_tokenizer, 32)
    captions = photos[1] + ODD_CAPTIONS
    expected = features(model, pixels(photos[0], 64), tokenizer(captions))[1]
    folder = tmp_path / "out" / "hf"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = hf_tokenizer(captions, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    assert hf_tokenizer.eos_token_id != 2 and json.loads((folder / "config.json").read_text())[
        "text_config"]["eos_token_id"] == hf_tokenizer.eos_token_id
    hf_model = transformers.CLIPModel.from_pretrained(folder).eval()
    with torch.no_grad():
        text = hf_model.get_text_features(input_ids=batch.input_ids).pooler_output
    assert_close(unit(text), expected, "CLIPModel texts, trained tokenizer")


def test_resnet_refused_by_transformers_written_elsewhere(tmp_path, photos, trained_tokenizer, capsys):
    checkpoint, model = save_checkpoint(get_preset("rn-tiny"), tmp_path / "checkpoint", seed=2)
    out = tmp_path / "out"
    status = main(["export", str(checkpoint), "--to", "hf", "openclip", "safetensors", "--output", str(out),
                   "--tokenizer", str(trained_tokenizer), "--dtype", "float16"])
    assert status == 2
    error = capsys.readouterr().err
    assert "hf: " in error and "ModifiedResNet" in error
    assert not (out / "hf").exists() and (out / "openclip" / "open_clip_model.safetensors").is_file()
    # OpenCLIP builds the ResNet and tokenizes with the trained tokenizer (through transformers).
    tokenizer = load_tokenizer(trained_tokenizer, 32)
    images, tokens = pixels(photos[0], 64), tokenizer(photos[1] + ODD_CAPTIONS)
    clip = open_clip.create_model(f"local-dir:{out / 'openclip'}").float().eval()
    assert torch.equal(open_clip.get_tokenizer(f"local-dir:{out / 'openclip'}")(photos[1] + ODD_CAPTIONS), tokens)
    # float16 weights: compared with the clip-ray model rounded the same way.
    rounded = load_safetensors_export(out / "safetensors" / "model.safetensors")
    expected_images, expected_texts = features(rounded, images, tokens)
    with torch.no_grad():
        assert_close(clip.encode_image(images, normalize=True), expected_images, "open_clip ResNet images")
        assert_close(clip.encode_text(tokens, normalize=True), expected_texts, "open_clip ResNet texts")
    assert (features(model, images, tokens)[0] - expected_images).abs().max() > 0  # the rounding did happen
    assert main(["export", str(checkpoint), "--to", "safetensors", "--output", str(out),
                 "--tokenizer", str(trained_tokenizer)]) == 2
    assert "already exist" in capsys.readouterr().err


def test_onnx_check_failure_keeps_no_folder(tmp_path, trained_tokenizer, capsys):
    checkpoint, _ = save_checkpoint(get_preset("rn-tiny"), tmp_path / "checkpoint", seed=3)
    status = main(["export", str(checkpoint), "--to", "onnx", "--output", str(tmp_path / "out"),
                   "--tokenizer", str(trained_tokenizer), "--onnx-tolerance", "0"])
    assert status == 1
    assert "onnx: image_encoder.onnx: onnxruntime's features differ" in capsys.readouterr().err
    assert not (tmp_path / "out" / "onnx").exists()


# --------------------------------------------------------------------------- tokenizer files alone


def test_transformers_tokenizer_files_give_clip_ray_ids(tmp_path, photos, clip_merges, trained_tokenizer):
    captions = photos[2] + ODD_CAPTIONS
    for name, tokenizer in (("clip", ClipTokenizer(clip_merges, 77)),
                            ("trained", load_tokenizer(trained_tokenizer, 32))):
        write_transformers_tokenizer(tokenizer, tmp_path / name)
        loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / name)
        batch = loaded(captions, padding="max_length", max_length=tokenizer.context_length, truncation=True,
                       return_tensors="pt")
        ids = batch.input_ids.masked_fill(batch.attention_mask == 0, tokenizer.pad_token_id)
        assert torch.equal(ids, tokenizer(captions)), name


def test_bad_requests_are_one_line_errors(vit_export, tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing-here"), "--to", "onnx", "--output", str(tmp_path / "out")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["export", str(vit_export["checkpoint"]), "--to", "onnx", "--output", str(tmp_path / "out"),
                 "--onnx-tolerance", "-1"]) == 2  # the checkpoint names no tokenizer: the run's, else --tokenizer
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--tokenizer" in error
    assert main(["export", str(vit_export["checkpoint"]), "--to", "onnx", "--output", str(tmp_path / "out"),
                 "--onnx-tolerance", "-1", "--tokenizer", str(vit_export["tokenizer_path"])]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "onnx tolerance -1.0: must be >= 0" in error
    assert not (tmp_path / "out").exists()
