"""`clip-ray eval MODEL --suite`: each task type on real photos from ../shared/data, on a real local Ray cluster,
against the same metrics computed here from the model's own features; the results files and the MLflow runs.

One suite run (zero-shot on a CIFAR-10 subset holding one broken image, a linear probe on a fixed split of the
CIFAR-10 test set, Flickr8k test retrieval on 50 photos) with one tiny model through the library, and one
tiny suite with a second checkpoint through the command line, into the same MLflow experiment.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from embed_helpers import make_workspace
from mlflow import MlflowClient
from repo_paths import REPO_ROOT

from clip_ray.cli import main
from clip_ray.config import ConfigError
from clip_ray.config.suite import load_suite, suite_from_dict
from clip_ray.data.formats import BadSample, Sample, list_image_folder, load_caption_csv, load_split
from clip_ray.data.stream.preprocess import Preprocessor, normalize
from clip_ray.driver.suite import evaluate_suite, prepare_suite
from clip_ray.driver.suite.tasks import stratified_split
from clip_ray.eval.linear_probe import linear_probe
from clip_ray.eval.retrieval import group_by_image, retrieval_recall
from clip_ray.eval.templates import CLASS_NAME_SETS, resolve_templates
from clip_ray.eval.zeroshot import zeroshot_accuracy, zeroshot_classifier
from clip_ray.inference.models import resolve_model
from clip_ray.model import build_model
from clip_ray.model.tokenizer import load_tokenizer
from clip_ray.tracking.tracker import mlflow_metric_name
from clip_ray.worker.checkpoint import save_training_state

RAY_INIT_KWARGS = {"num_cpus": 2}
pytestmark = pytest.mark.usefixtures("ray_cluster", "one_intra_op_thread")

PER_CLASS = 12  # CIFAR-10 photos per class in the zero-shot subset
PROBE_PER_CLASS = 16  # photos per class the probe's split takes from the whole test set
RETRIEVAL_IMAGES = 50
EXPERIMENT = "suite-test"
TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}."]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, cifar10_dir, flickr8k_dir):
    """Two tiny checkpoints with one tokenizer, a CIFAR-10 subset with a broken JPEG, and the suite file."""
    root = tmp_path_factory.mktemp("suite")
    space = make_workspace(root, shards=1, per_shard=4)
    torch.manual_seed(1)
    other = build_model("vit-tiny").eval()
    save_training_state(root / "runs" / "other" / "checkpoint_000005", model=other,
                        optimizer=torch.optim.AdamW(other.parameters()), step=5, mlflow_run_id="trainingrun0001",
                        config={"data": {"tokenizer": str(space.tokenizer)}})
    subset = root / "cifar-subset"
    for folder in sorted(p for p in cifar10_dir.iterdir() if p.is_dir()):
        (subset / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:PER_CLASS]:
            shutil.copy(image, subset / folder.name / image.name)
    good = (subset / "cat" / sorted(p.name for p in (subset / "cat").iterdir())[0]).read_bytes()
    (subset / "cat" / "zz-broken.jpg").write_bytes(good[: len(good) // 3])  # its header reads, its pixels do not
    suite = {
        "name": "test-suite",
        "defaults": {"batch_size": 64, "samples_per_partition": 50, "max_failure_fraction": 0.05},
        "tasks": [
            {"name": "cifar-zeroshot", "type": "zeroshot", "images": {"image_folder": str(subset)},
             "class_names": "cifar10", "templates": TEMPLATES},
            {"name": "cifar-probe", "type": "linear_probe",
             "images": {"image_folder": str(cifar10_dir), "max_per_class": PROBE_PER_CLASS},
             "train_fraction": 0.5, "seed": 3, "shots": [1, 4]},
            {"name": "flickr-retrieval", "type": "retrieval", "max_images": RETRIEVAL_IMAGES,
             "source": {"path": str(flickr8k_dir), "format": "csv", "split_file": "splits/test.txt"}},
        ],
    }
    (root / "suite.yaml").write_text(yaml.safe_dump(suite))
    return {"root": root, "space": space, "other": root / "runs" / "other", "subset": subset,
            "suite": root / "suite.yaml", "uri": f"sqlite:///{root / 'mlflow.db'}"}


@pytest.fixture(scope="module")
def outcome(workspace):
    model = resolve_model(str(workspace["space"].run_dir))
    return evaluate_suite(load_suite(workspace["suite"]), model, output=str(workspace["root"] / "results"),
                          tracking_uri=workspace["uri"], experiment=EXPERIMENT)


# --------------------------------------------------------------------------- the same numbers computed here


@pytest.fixture(scope="module")
def direct(workspace):
    """The model in this process, its tokenizer and the eval preprocessing of the suite."""
    model = workspace["space"].model
    tokenizer = load_tokenizer(workspace["space"].tokenizer, model.config.text.context_length)
    prepare = Preprocessor(model.config.vision.image_size, model.config.text.context_length, tokenizer, train=False)
    return model, tokenizer, prepare


def image_features(direct, paths: list[str]) -> tuple[np.ndarray, list[int]]:
    """Unit features of the images that decode, and the indices of those that do."""
    model, _, prepare = direct
    pixels, kept = [], []
    for i, path in enumerate(paths):
        try:
            pixels.append(prepare.image(Sample(key=str(i), image=Path(path).read_bytes(), caption="")))
            kept.append(i)
        except BadSample:
            pass
    with torch.no_grad():
        features = model.encode_image(torch.from_numpy(normalize(np.stack(pixels).transpose(0, 3, 1, 2))))
    return features.numpy(), kept


def test_zeroshot_equals_the_in_process_model(outcome, workspace, direct):
    model, tokenizer, _ = direct
    classes, listed = list_image_folder(str(workspace["subset"]))
    assert classes == list(CLASS_NAME_SETS["cifar10"])
    features, kept = image_features(direct, [path for path, _ in listed])
    labels = torch.tensor([listed[i][1] for i in kept])
    classifier = zeroshot_classifier(model.encode_text,
                                     lambda texts: tokenizer(texts, context_length=model.config.text.context_length),
                                     classes, resolve_templates(TEMPLATES))
    expected = zeroshot_accuracy(torch.from_numpy(features), classifier, labels)
    metrics = outcome.tasks["cifar-zeroshot"]["metrics"]
    assert set(expected) == {"top1", "top5", "mean_per_class_recall"}
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-9), name
    assert metrics["num_images"] == len(kept) == 10 * PER_CLASS
    assert metrics["skipped_images"] == 1  # the broken JPEG: skipped and counted, not fatal
    counts = outcome.tasks["cifar-zeroshot"]["counts"]
    assert sum(counts["failed"].values()) == 1 and counts["ok"] == 10 * PER_CLASS


def test_linear_probe_equals_the_library_on_in_process_features(outcome, cifar10_dir, direct):
    _, listed = list_image_folder(str(cifar10_dir))
    train, test = stratified_split(listed, 0.5, 3, PROBE_PER_CLASS)
    assert not {p for p, _ in train} & {p for p, _ in test}
    assert np.bincount([c for _, c in train]).tolist() == [PROBE_PER_CLASS // 2] * 10  # stratified
    assert np.bincount([c for _, c in test]).tolist() == [PROBE_PER_CLASS // 2] * 10
    assert (train, test) == stratified_split(listed, 0.5, 3, PROBE_PER_CLASS)  # fixed by the seed
    train_x, _ = image_features(direct, [p for p, _ in train])
    test_x, _ = image_features(direct, [p for p, _ in test])
    train_y, test_y = np.array([c for _, c in train]), np.array([c for _, c in test])
    metrics = outcome.tasks["cifar-probe"]["metrics"]
    for shots, variant in ((1, "1shot"), (4, "4shot"), (None, "full")):
        expected = linear_probe(train_x, train_y, test_x, test_y, seed=3, num_classes=10, shots=shots)
        assert metrics[f"{variant}/c"] == expected.c, variant
        for name, value in expected.metrics(f"{variant}/").items():
            assert metrics[name] == pytest.approx(value, abs=1e-9), name
    assert metrics["num_train_images"] == metrics["num_test_images"] == 10 * PROBE_PER_CLASS // 2
    assert outcome.tasks["cifar-probe"]["info"]["variants"]["4shot"]["train_count"] == 40


def test_retrieval_equals_recall_on_in_process_features(outcome, flickr8k_dir, direct):
    model, tokenizer, prepare = direct
    names = load_split(flickr8k_dir / "splits" / "test.txt")[:RETRIEVAL_IMAGES]
    table = load_caption_csv(flickr8k_dir / "captions.csv")
    images, kept = image_features(direct, [str(flickr8k_dir / "images" / name) for name in names])
    assert len(kept) == RETRIEVAL_IMAGES
    captions = [(i, caption.strip()) for i, name in enumerate(names) for caption, _ in table[name]]
    with torch.no_grad():
        texts = model.encode_text(torch.from_numpy(prepare.text([caption for _, caption in captions])))
    expected = retrieval_recall(torch.from_numpy(images), texts, torch.tensor([i for i, _ in captions]))
    metrics = outcome.tasks["flickr-retrieval"]["metrics"]
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-9), name
    assert metrics["num_images"] == RETRIEVAL_IMAGES and metrics["num_captions"] == 5 * RETRIEVAL_IMAGES == 250
    assert metrics["skipped_images"] == 0 and metrics["captions_dropped"] == 0


# --------------------------------------------------------------------------- files, MLflow, the command line


def test_results_files_hold_the_same_numbers(outcome):
    folder = Path(outcome.output)
    with open(folder / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    from_csv = {f"{row['task']}/{row['metric']}": float(row["value"]) for row in rows}
    assert from_csv == outcome.metrics
    assert {"cifar-zeroshot/top1", "cifar-probe/4shot/top1", "cifar-probe/full/c",
            "flickr-retrieval/text_to_image_R@10"} <= set(from_csv)
    markdown = (folder / "results.md").read_text().splitlines()
    table = [[cell.strip() for cell in line.split("|")] for line in markdown[4:]]  # after title, header, rule
    cells = {f"{parts[1]}/{parts[2]}": parts[3] for parts in table if len(parts) > 3}
    assert set(cells) == set(from_csv)
    for name, value in from_csv.items():
        is_count = name.rsplit("/", 1)[-1].startswith(("num_", "skipped_", "captions_"))
        assert cells[name] == (str(int(value)) if is_count else f"{value:.3f}"), name
    summary = json.loads((folder / "results.json").read_text())
    assert summary["metrics"] == outcome.metrics and summary["mlflow"]["run_id"] == outcome.run_id


@pytest.fixture(scope="module")
def cli_run(outcome, workspace):
    """The second checkpoint on a one-task suite, through `clip-ray eval --suite`, into the same experiment:
    zero-shot on a labelled source this time, a captions CSV whose caption is each photo's class name."""
    subset = workspace["subset"]
    with open(subset / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for folder in sorted(p for p in subset.iterdir() if p.is_dir()):
            writer.writerows([f"{folder.name}/{image.name}", folder.name] for image in sorted(folder.iterdir())[:4])
    source = {"path": str(subset), "format": "csv", "captions_file": "labels.csv", "images_dir": "."}
    tiny = {"name": "tiny", "defaults": {"batch_size": 16},
            "tasks": [{"name": "cifar-zeroshot", "type": "zeroshot", "templates": TEMPLATES, "class_names": "cifar10",
                       "images": {"source": source, "label": "caption", "max_per_class": 2}}]}
    path = workspace["root"] / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny))
    out = workspace["root"] / "cli-results"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(["eval", str(workspace["other"]), "--suite", str(path), "--output", str(out),
                       "--tracking-uri", workspace["uri"], "--experiment", EXPERIMENT,
                       "--set", "tasks.cifar-zeroshot.images.max_per_class=3"])
    return {"status": status, "out": out, "printed": printed.getvalue()}


def test_each_evaluation_is_one_mlflow_run_naming_its_model(outcome, cli_run, workspace):
    assert cli_run["status"] == 0
    client = MlflowClient(workspace["uri"])
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = {run.info.run_id: run for run in client.search_runs([experiment.experiment_id])}
    assert len(runs) == 2 and outcome.run_id in runs
    first = runs.pop(outcome.run_id)
    (second,) = runs.values()
    assert first.data.metrics == pytest.approx({mlflow_metric_name(k): v for k, v in outcome.metrics.items()})
    assert "flickr-retrieval/text_to_image_R_at_1" in first.data.metrics
    assert first.data.params["suite.name"] == "test-suite" and first.data.params["suite.tasks.1.type"] == "linear_probe"
    tags = first.data.tags
    assert tags["clip_ray.model.source"] == str(workspace["space"].run_dir)
    assert tags["clip_ray.model.location"] == str(workspace["space"].checkpoint) and tags["clip_ray.model.step"] == "3"
    assert len(tags["clip_ray.model.sha256"]) == 64 and tags["clip_ray.eval.suite"] == "test-suite"
    other = second.data.tags
    assert other["clip_ray.model.source"] == str(workspace["other"]) and other["clip_ray.model.step"] == "5"
    assert other["clip_ray.model.sha256"] != tags["clip_ray.model.sha256"]
    assert other["clip_ray.model.training_run_id"] == "trainingrun0001"
    # The CLI prints a link to its run in the MLflow UI's machine-learning view, and the run carries the source tags.
    link = (f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs/{second.info.run_id}"
            "?workflowType=machine_learning")
    assert f"  this run: {link}\n" in cli_run["printed"], cli_run["printed"]
    assert other["mlflow.source.type"] == "LOCAL" and other["mlflow.user"] and other["mlflow.source.name"]
    assert second.data.metrics["cifar-zeroshot/num_images"] == 30  # --set reached the task by its name
    assert second.data.metrics["cifar-zeroshot/skipped_images"] == 0
    assert set(second.data.metrics) == {f"cifar-zeroshot/{m}" for m in
                                        ("top1", "top5", "mean_per_class_recall", "num_images", "skipped_images")}
    assert first.info.status == second.info.status == "FINISHED"
    artifacts = {item.path for item in client.list_artifacts(outcome.run_id)}
    assert artifacts == {"results.csv", "results.md", "results.json"}
    assert (cli_run["out"] / "results.csv").is_file()


# --------------------------------------------------------------------------- loading and checking suites


@pytest.mark.parametrize("name", ["shared.yaml", "demo.yaml", "imagenet.yaml.example"])
def test_shipped_suites_load(name, request):
    suite = load_suite(REPO_ROOT / "configs" / "suites" / name)
    assert suite.tasks and len({task.name for task in suite.tasks}) == len(suite.tasks)
    if name == "shared.yaml":
        request.getfixturevalue("cifar10_dir"), request.getfixturevalue("flickr8k_dir")  # skip without ../shared
        prepared = prepare_suite(suite)
        assert [task.type for task in prepared.tasks] == ["zeroshot", "linear_probe", "retrieval"]
        assert prepared.tasks[1].shots == [1, 4, 16] and Path(prepared.tasks[0].images.image_folder).is_absolute()


def bad_suite_error(workspace, **task) -> str:
    data = {"name": "bad", "tasks": [{"name": "broken-task", "type": "zeroshot",
                                      "images": {"image_folder": str(workspace["subset"])}, **task}]}
    with pytest.raises(ConfigError) as error:
        prepare_suite(suite_from_dict(data))
    return str(error.value)


def test_bad_suites_fail_naming_the_task_and_field(workspace):
    assert "tasks[0] (broken-task).images.colour: unknown key" in bad_suite_error(
        workspace, images={"image_folder": str(workspace["subset"]), "colour": "red"})
    assert "tasks[0] (broken-task).class_names='cifar11'" in bad_suite_error(workspace, class_names="cifar11")
    assert "tasks[0] (broken-task).class_names: 100 names do not match the 10 class folders" in bad_suite_error(
        workspace, class_names="cifar100")
    assert "tasks[0] (broken-task).images.image_folder=" in bad_suite_error(
        workspace, images={"image_folder": str(workspace["root"] / "nowhere")})
    assert "tasks[0] (broken-task).templates" in bad_suite_error(workspace, templates=["no placeholder"])


def test_cli_exits_2_on_a_bad_suite_before_ray(workspace, capsys):
    path = workspace["root"] / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "tasks": [{"name": "t", "type": "retrieval",
                                                               "source": {"path": "/nowhere", "format": "csv"}}]}))
    assert main(["eval", str(workspace["space"].run_dir), "--suite", str(path)]) == 2
    assert "tasks[0] (t).source.path='/nowhere': no such folder" in capsys.readouterr().err


def test_pairs_are_grouped_by_image_in_order_of_first_appearance():
    """What the training-time evaluation and a suite's shard retrieval both feed retrieval_recall with."""
    first_rows, owners = group_by_image(["b.jpg", "a.jpg", "b.jpg", "c.jpg", "a.jpg"])
    assert first_rows == [0, 1, 3] and owners == [0, 1, 0, 2, 1]
