"""Near copies of evaluation images dropped by curation (`--near-duplicate-threshold`), on Flickr8k photos and
a saved tiny model, on a real local Ray cluster: training pairs hold re-encoded and resized copies of the photos
of a small evaluation ImageFolder, an exact copy, ordinary photos and a corrupt image; the run's choice is
checked against cosines computed here, in-process, with the same model and preprocessing."""

from __future__ import annotations

import io
import json
import random
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from embed_helpers import make_workspace
from PIL import Image
from test_curate_clip_score import kept_samples, threshold_between

from clip_ray.cli import main
from clip_ray.config.clip_score import ClipScoreConfig
from clip_ray.data.formats import Sample, load_caption_csv, load_split
from clip_ray.data.formats.samples import DEFAULT_MAX_PIXELS
from clip_ray.data.offline.overlap import EvalImages
from clip_ray.data.stream.preprocess import Preprocessor, normalize
from clip_ray.inference.models import resolve_model
from clip_ray.inference.near_duplicates import embed_eval_images

RAY_INIT_KWARGS = {"num_cpus": 3}
PER_SHARD = 7
CORRUPT = b"\xff\xd8\xff\xe0" + random.Random(5).randbytes(2000)  # a training image; the evaluation one differs


def reencoded(image: bytes, quality: int, size: int | None = None) -> bytes:
    """`image` decoded, optionally resized to size x size, and saved again as JPEG at `quality`."""
    picture = Image.open(io.BytesIO(image)).convert("RGB")
    if size is not None:
        picture = picture.resize((size, size), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=quality)
    return out.getvalue()


def write_tar(path, pairs: dict[str, tuple[bytes, str]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, (image, caption) in pairs.items():
            for name, data in ((f"{key}.jpg", image), (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def constructed(tmp_path_factory, flickr8k_dir, one_intra_op_thread):
    """An evaluation ImageFolder of 4 test photos and a corrupt file; 13 training pairs in two tar shards:
    4 near copies of the evaluation photos (JPEG quality 60, or resized and re-encoded), 1 byte-exact copy, 7
    training photos, 1 corrupt image; every caption contains "photo". The tiny model; each decodable
    candidate's highest cosine to an evaluation photo, computed here."""
    root = tmp_path_factory.mktemp("near_duplicates")
    workspace = make_workspace(root, shards=1, per_shard=2)
    images = flickr8k_dir / "images"
    captions = load_caption_csv(flickr8k_dir / "captions.csv")
    evaluation = {name: (images / name).read_bytes() for name in load_split(flickr8k_dir / "splits" / "test.txt")[:4]}
    for i, (name, image) in enumerate(evaluation.items()):
        (root / "eval" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / "eval" / f"class{i % 2}" / name).write_bytes(image)
    (root / "eval" / "class0" / "broken.jpg").write_bytes(CORRUPT[:1000])
    originals = list(evaluation.values())
    copies = {"q60_0": reencoded(originals[0], 60), "q60_1": reencoded(originals[1], 60),
              "r96_2": reencoded(originals[2], 85, 96), "r80_3": reencoded(originals[3], 60, 80)}
    train_names = load_split(flickr8k_dir / "splits" / "train.txt")[:7]
    ordinary = {f"train{i}": (images / name).read_bytes() for i, name in enumerate(train_names)}
    all_images = {**copies, "exact_0": originals[0], **ordinary, "corrupt": CORRUPT}
    caption_of = list(evaluation) + train_names
    pairs = {key: (image, "A photo: " + captions[caption_of[i % len(caption_of)]][0][0])
             for i, (key, image) in enumerate(all_images.items())}
    keys = list(pairs)
    for shard in range(2):
        write_tar(root / f"{shard}.tar", {key: pairs[key] for key in keys[shard * PER_SHARD:(shard + 1) * PER_SHARD]})
    (root / "queries.txt").write_text("photo\n")

    model = resolve_model(str(workspace.run_dir))
    config = model.model_config
    preprocessor = Preprocessor(config.vision.image_size, config.text.context_length, model.tokenizer, train=False,
                                uint8_images=True)

    def embed(encoded: list[bytes]) -> torch.Tensor:
        pixels = np.stack([preprocessor.image(Sample(key="", image=image, caption="")) for image in encoded])
        with torch.no_grad():
            return F.normalize(workspace.model.encode_image(torch.from_numpy(normalize(pixels.transpose(0, 3, 1, 2)))),
                               dim=-1)

    eval_vectors = embed(originals)
    scored = {**copies, **ordinary}  # the exact copy goes by its hash first; the corrupt image never decodes
    cosines = embed(list(scored.values())) @ eval_vectors.T
    return {"root": root, "run_dir": workspace.run_dir, "model": model, "copies": set(copies),
            "ordinary": set(ordinary), "eval_vectors": eval_vectors,
            "nearest": dict(zip(scored, cosines.max(dim=1).values.tolist())),
            "nearest_is_own": [row.argmax().item() for row in cosines[:len(copies)]] == list(range(len(copies)))}


@pytest.fixture(scope="module")
def curated(constructed, ray_cluster):
    """One run through the command line: query "photo", the evaluation folder, the threshold midway between the
    ordinary photos' highest cosine and the copies' lowest; the scan does not decode, so the corrupt pair is first
    met by the near-duplicate scorer."""
    others = len(constructed["ordinary"])
    threshold = threshold_between(list(constructed["nearest"].values()), others - 1, others)
    root, out = constructed["root"], constructed["root"] / "out"
    status = main(["data", "curate", str(root / "{0,1}.tar"), str(out), "--queries", str(root / "queries.txt"),
                   "--samples-per-shard", str(PER_SHARD), "--no-validate-images",
                   "--exclude-images", f"imagefolder:{root / 'eval'}", "--near-duplicate-threshold", repr(threshold),
                   "--clip-model", str(constructed["run_dir"]), "--clip-batch-size", "8", "--clip-actors", "1"])
    return status, threshold, json.loads((out / "report.json").read_text()), kept_samples(out)


@pytest.mark.shared_data
def test_the_copies_are_nearer_to_their_originals_than_any_other_photo_is(constructed):
    nearest = constructed["nearest"]
    lowest_copy = min(nearest[key] for key in constructed["copies"])
    highest_other = max(nearest[key] for key in constructed["ordinary"])
    assert constructed["nearest_is_own"] and lowest_copy > highest_other + 1e-3


@pytest.mark.shared_data
def test_pairs_at_or_above_the_threshold_are_eval_overlap_and_the_rest_stay(curated, constructed):
    status, threshold, report, kept = curated
    nearest = constructed["nearest"]
    at_or_above = {key for key, cosine in nearest.items() if cosine >= threshold}
    assert status == 0 and at_or_above == constructed["copies"]
    assert set(kept) == set(nearest) - at_or_above == constructed["ordinary"]
    assert report["dropped"]["eval_overlap"] == 1 + len(at_or_above)  # the exact copy, by its hash
    assert sum(n for reason, n in report["dropped"].items() if reason in ("corrupt_image", "truncated_image")) == 1
    assert {reason for reason, n in report["dropped"].items() if n} <= {"eval_overlap", "corrupt_image",
                                                                         "truncated_image"}
    assert report["pairs_seen"] == 13 == report["kept"] + sum(report["dropped"].values())
    assert report["kept"] == report["samples_written"] == len(kept)


@pytest.mark.shared_data
def test_the_report_says_the_threshold_the_model_and_what_was_compared(curated, constructed):
    _, threshold, report, kept = curated
    overlap = report["eval_overlap"]
    assert overlap["exact"] == 1 and overlap["images"] == 5  # the hashing reads the corrupt file's bytes too
    near = overlap["near_duplicates"]
    assert near["threshold"] == threshold and near["dropped"] == len(constructed["copies"])
    assert near["model"] == constructed["model"].identity() and near["eval_images"] == 4
    assert sum(near["eval_image_failures"].values()) == 1
    assert report["clip_score"] is None and all("clip_score" not in sample.meta for sample in kept.values())


@pytest.mark.shared_data
def test_evaluation_embeddings_are_the_in_process_ones(constructed, ray_cluster):
    config = ClipScoreConfig(model=str(constructed["run_dir"]), batch_size=3)
    embeddings, failures = embed_eval_images([EvalImages(image_folder=str(constructed["root"] / "eval"))],
                                             constructed["model"], config, DEFAULT_MAX_PIXELS)
    assert embeddings.dtype == np.float32 and embeddings.shape == tuple(constructed["eval_vectors"].shape)
    # Row order follows the folder listing: each in-process vector has its own row, equal to float32 rounding.
    cosines = torch.from_numpy(embeddings) @ constructed["eval_vectors"].T
    assert sorted(cosines.argmax(dim=0).tolist()) == [0, 1, 2, 3]
    assert cosines.max(dim=0).values.min().item() > 1 - 1e-5
    assert sum(failures.values()) == 1 and set(failures) <= {"corrupt_image", "truncated_image"}


@pytest.mark.parametrize("flags, culprit", [
    (["--exclude-images", "imagefolder:E", "--queries", "q"], "--near-duplicate-threshold: needs --clip-model"),
    (["--clip-model", "M", "--queries", "q"], "--near-duplicate-threshold: needs --exclude-images"),
    (["--clip-model", "M", "--exclude-images", "imagefolder:E", "--queries", "q", "--near-duplicate-threshold",
      "1.5"], "--near-duplicate-threshold: the near-duplicate threshold is a cosine"),
    (["--clip-model", "M", "--exclude-images", "imagefolder:E", "--clip-actors", "0"], "--clip-actors=0"),
    (["--clip-model", "M", "--exclude-images", "imagefolder:E"], "--queries"),
])
def test_bad_near_duplicate_settings_are_one_line_naming_the_flag(flags, culprit, tmp_path, capsys):
    flags = flags if "--near-duplicate-threshold" in flags else [*flags, "--near-duplicate-threshold", "0.95"]
    assert main(["data", "curate", str(tmp_path), str(tmp_path / "out"), *flags]) == 2
    assert culprit in capsys.readouterr().err


def test_a_near_duplicate_threshold_alone_needs_no_clip_score_threshold(tmp_path, capsys):
    """Past the flag checks, the model is resolved (and missing here): no --min-clip-score was asked for."""
    missing = tmp_path / "no-such-run"
    assert main(["data", "curate", str(tmp_path), str(tmp_path / "out"), "--queries", "q", "--clip-model",
                 str(missing), "--exclude-images", "imagefolder:E", "--near-duplicate-threshold", "0.95"]) == 2
    err = capsys.readouterr().err
    assert "--clip-model" in err and str(missing) in err and "--min-clip-score" not in err
