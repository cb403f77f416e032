"""`clip-ray wise-ft`: weight-space mixtures of a small CLIP before and after a short training on real Flickr8k
photos, on a real local Ray cluster and a real MLflow store on disk.

The initial model is the small CLIP's random init (a model.pt file), the fine-tuned one the same init after 20
steps (a run directory). One command-line run mixes them at alphas 0, 0.5 and 1 and scores each mixture on a
Flickr8k test retrieval suite; the tests check the mixtures' weights and embeddings against the two models,
the table against the MLflow run, and the saved best mixture against the mixing done here. A second, library
run scores two mixtures with a training config's own evaluation (the Evaluator on data.val).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from flickr_embed_helpers import caption_folder, flickr_captions, split_names, train_small_clip
from mlflow import MlflowClient

from clip_ray.cli import main
from clip_ray.config import ConfigError, load_config, to_dict
from clip_ray.data.formats import Sample, ShardWriter
from clip_ray.data.stream.preprocess import normalize
from clip_ray.driver.wise_ft import (
    ConfigMixtures, build_mixture, check_alphas, mix_state_dicts, mixture_config, resolve_pair, wise_ft)
from clip_ray.eval.evaluate import Evaluator
from clip_ray.inference.models import resolve_model
from clip_ray.model import build_model
from clip_ray.model.tokenizer import load_tokenizer, train_bpe_tokenizer
from clip_ray.worker.checkpoint import load_training_state, save_training_state

RAY_INIT_KWARGS = {"num_cpus": 2}
pytestmark = pytest.mark.usefixtures("ray_cluster", "one_intra_op_thread")

PHOTOS = 64  # train-split photos the small CLIP learns from
STEPS = 20
RETRIEVAL_PHOTOS = 24  # test-split photos the suite retrieves among (two captions each)
ALPHAS = [0.0, 0.5, 1.0]
EXPERIMENT = "wise-ft-test"
RECALL = "flickr-retrieval/image_to_text_R@5"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, flickr8k_dir):
    """The initial model as a model.pt file, the fine-tuned one as a run directory (same tokenizer bytes), and a
    one-task suite: Flickr8k test retrieval on a few photos."""
    root = tmp_path_factory.mktemp("wise-ft")
    finetuned = train_small_clip(flickr8k_dir, root / "finetuned", photos=PHOTOS, steps=STEPS, seed=0)
    torch.manual_seed(0)  # the init train_small_clip started from
    initial = build_model(finetuned.model.config).eval()
    initial_file = save_model_file(root / "initial.pt", initial)
    # Test photos with two captions each as WebDataset pairs: one pass through the encoder actors per mixture.
    captions = flickr_captions(flickr8k_dir)
    with ShardWriter(str(root / "shards"), 1000) as writer:
        for name in split_names(flickr8k_dir, "test", RETRIEVAL_PHOTOS):
            for i, caption in enumerate(captions[name][:2]):
                writer.write(f"{Path(name).stem}_{i}", (flickr8k_dir / "images" / name).read_bytes(), caption,
                             meta={"image": name})
    suite = {"name": "wise-ft-test-suite", "defaults": {"batch_size": 64, "samples_per_partition": 100},
             "tasks": [{"name": "flickr-retrieval", "type": "retrieval",
                        "source": {"path": str(root / "shards"), "format": "webdataset"}}]}
    (root / "suite.yaml").write_text(yaml.safe_dump(suite))
    return {"root": root, "initial": SimpleNamespace(model=initial), "finetuned": finetuned,
            "initial_file": initial_file, "suite": root / "suite.yaml", "uri": f"sqlite:///{root / 'mlflow.db'}",
            "output": root / "out"}


def save_model_file(path: Path, model: torch.nn.Module) -> Path:
    """A model.pt as a checkpoint holds it: the model's config and its weights."""
    torch.save({"model_config": to_dict(model.config), "state_dict": model.state_dict()}, path)
    return path


def wise_ft_command(workspace, *extra: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["wise-ft", "--initial", str(workspace["initial_file"]),
                       "--finetuned", str(workspace["finetuned"].run_dir), *extra])
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def cli_run(workspace):
    """No --tokenizer: the initial model.pt records none and takes the fine-tuned run's."""
    status, printed, errors = wise_ft_command(
        workspace, "--suite", str(workspace["suite"]), "--alphas", ",".join(map(str, ALPHAS)),
        "--output", str(workspace["output"]),
        "--tracking-uri", workspace["uri"], "--experiment", EXPERIMENT, "--keep-mixtures")
    assert status == 0, errors
    summary = json.loads((workspace["output"] / "wise_ft.json").read_text())
    return {"printed": printed, "summary": summary}


def weights(workspace, role: str) -> dict[str, torch.Tensor]:
    return workspace[role].model.state_dict()


def embeddings(model, workspace, flickr8k_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and caption features of four real test photos, with the small CLIP's own preprocessing."""
    prepare = workspace["finetuned"].preprocessor
    names = split_names(flickr8k_dir, "test", 4)
    captions = flickr_captions(flickr8k_dir)
    pixels = np.stack([prepare.image(Sample(key=n, image=(flickr8k_dir / "images" / n).read_bytes(), caption=""))
                       for n in names])
    tokens = torch.from_numpy(np.concatenate([prepare.text(captions[n][:1]) for n in names]))
    with torch.no_grad():
        return (model.encode_image(torch.from_numpy(normalize(pixels.transpose(0, 3, 1, 2)))),
                model.encode_text(tokens))


# --------------------------------------------------------------------------- mixing


def test_mixtures_are_the_two_models_at_the_ends_and_their_mean_between(workspace):
    initial, finetuned = weights(workspace, "initial"), weights(workspace, "finetuned")
    assert any(not torch.equal(initial[name], finetuned[name]) for name in initial), "training moved the weights"
    at_zero, at_one, half = (mix_state_dicts(initial, finetuned, alpha) for alpha in (0.0, 1.0, 0.5))
    assert all(torch.equal(at_zero[name], initial[name]) and torch.equal(at_one[name], finetuned[name])
               for name in initial)
    assert all(torch.equal(half[name], (initial[name] + finetuned[name]) / 2) for name in initial)
    quarter = mix_state_dicts(initial, finetuned, 0.25)
    name = "visual.proj"
    torch.testing.assert_close(quarter[name], 0.75 * initial[name] + 0.25 * finetuned[name], rtol=0, atol=1e-7)
    # Counters are not weights: a BatchNorm batch count is the fine-tuned model's, whatever alpha.
    count = "bn.num_batches_tracked"
    counted = mix_state_dicts({count: torch.tensor(10)}, {count: torch.tensor(70)}, 0.5)
    assert counted[count].item() == 70 and not counted[count].is_floating_point()


def test_mixtures_at_the_ends_embed_as_the_two_models(cli_run, workspace, flickr8k_dir):
    mixtures = workspace["output"] / "alphas"
    tokenizer = str(workspace["finetuned"].tokenizer)
    for alpha, role in (("0.00", "initial"), ("1.00", "finetuned")):
        mixture = resolve_model(str(mixtures / f"alpha-{alpha}" / "model.pt"), tokenizer).load()
        for got, want in zip(embeddings(mixture, workspace, flickr8k_dir),
                             embeddings(workspace[role].model, workspace, flickr8k_dir)):
            assert torch.equal(got, want), f"alpha {alpha} is not the {role} model"
    half = resolve_model(str(mixtures / "alpha-0.50" / "model.pt"), tokenizer).load().state_dict()
    initial, finetuned = weights(workspace, "initial"), weights(workspace, "finetuned")
    assert all(torch.equal(half[name], (initial[name] + finetuned[name]) / 2) for name in initial)
    assert (mixtures / "alpha-0.50" / "results.json").is_file(), "each mixture's suite results beside it"


# --------------------------------------------------------------------------- the table and the MLflow run


def test_the_table_and_the_mlflow_run_agree_and_the_best_is_the_maximum(cli_run, workspace):
    summary = cli_run["summary"]
    assert summary["alphas"] == ALPHAS and summary["selection"] == [
        "flickr-retrieval/image_to_text_R@5", "flickr-retrieval/text_to_image_R@5"]
    scores = {float(alpha): score for alpha, score in summary["scores"].items()}
    for alpha, metrics in summary["metrics"].items():
        assert scores[float(alpha)] == pytest.approx(np.mean([metrics[name] for name in summary["selection"]]))
    assert summary["best_alpha"] == max(ALPHAS, key=lambda alpha: (scores[alpha], -alpha))

    client = MlflowClient(workspace["uri"])
    run = client.get_run(summary["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("wise-ft ")
    history = client.get_metric_history(run.info.run_id, "flickr-retrieval/image_to_text_R_at_5")
    assert sorted((m.step, m.value) for m in history) == [
        (round(100 * alpha), pytest.approx(summary["metrics"][repr(alpha)][RECALL])) for alpha in ALPHAS]
    score_history = client.get_metric_history(run.info.run_id, "wise_ft/score")
    assert {m.step: m.value for m in score_history} == pytest.approx({round(100 * a): s for a, s in scores.items()})
    metrics = run.data.metrics
    assert metrics["wise_ft/best_alpha"] == summary["best_alpha"]
    assert metrics["best/score"] == pytest.approx(max(scores.values()))
    assert metrics["best/flickr-retrieval/image_to_text_R_at_5"] == pytest.approx(
        summary["best_metrics"][RECALL])
    tags, params = run.data.tags, run.data.params
    assert tags["clip_ray.wise_ft.initial.source"] == str(workspace["initial_file"])
    assert tags["clip_ray.wise_ft.finetuned.kind"] == "checkpoint"
    assert tags["clip_ray.wise_ft.best_alpha"] == str(summary["best_alpha"]) and tags["mlflow.source.name"]
    assert params["wise_ft.alphas"] == "0,0.5,1" and params["wise_ft.evaluation"] == "suite"
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"wise_ft.csv", "wise_ft.md", "wise_ft.json", "best_model", "alphas"} <= artifacts
    assert {Path(item.path).name for item in client.list_artifacts(run.info.run_id, "best_model")} >= {
        "model.pt", "manifest.json", "tokenizer.json"}
    # What a person reads: the table with the best row marked, the model, and the run in the UI's ML view.
    printed = cli_run["printed"]
    assert f"{summary['best_alpha']:.2f} *" in printed and summary["best_model"] in printed
    assert "?workflowType=machine_learning" in printed


def test_the_best_mixture_loads_through_resolve_model_alone(cli_run, workspace, flickr8k_dir):
    summary = cli_run["summary"]
    best = resolve_model(summary["best_model"])  # its run config names the tokenizer copied beside it
    assert best.kind == "checkpoint" and best.tokenizer_sha256 == resolve_model(
        str(workspace["finetuned"].run_dir)).tokenizer_sha256
    mixed = build_mixture(workspace["finetuned"].model.config,
                          mix_state_dicts(weights(workspace, "initial"), weights(workspace, "finetuned"),
                                          summary["best_alpha"]))
    for got, want in zip(embeddings(best.load(), workspace, flickr8k_dir), embeddings(mixed, workspace, flickr8k_dir)):
        assert torch.equal(got, want)
    assert load_training_state(summary["best_model"])["config"]["wise_ft"]["alpha"] == summary["best_alpha"]


# --------------------------------------------------------------------------- a config's own evaluation


def test_a_config_evaluation_scores_each_mixture(workspace, flickr8k_dir):
    val, _ = caption_folder(flickr8k_dir, workspace["root"] / "val", "test", 16)
    source = f"[{{path: {val}, format: csv}}]"
    config = load_config(None, [
        "model.preset=vit-tiny", f"data.train={source}", f"data.val={source}",
        f"data.tokenizer={workspace['finetuned'].tokenizer}", "eval.batch_size=16", "eval.max_val_samples=null",
        f"cluster.storage_path={workspace['root'] / 'runs'}"])
    initial, finetuned = resolve_pair(str(workspace["initial_file"]), str(workspace["finetuned"].run_dir),
                                      str(workspace["finetuned"].tokenizer))
    mixtures = ConfigMixtures(config)
    outcome = wise_ft(initial, finetuned, mixtures, alphas=[0.0, 1.0],
                      output=str(workspace["root"] / "config-out"), log_to_mlflow=False)
    assert outcome.selection == ["val/image_to_text_R@5", "val/text_to_image_R@5"]
    assert outcome.metrics[0.0]["val/num_captions"] == 80 and outcome.metrics[1.0]["val/num_images"] == 16
    # The mixtures at the ends are the two models: the Evaluator gives them the same figures.
    assert mixtures.config.data.tokenizer.startswith(str(workspace["root"] / "config-out" / "best"))
    direct = Evaluator(mixtures.config, load_tokenizer(workspace["finetuned"].tokenizer, 32), torch.device("cpu"))
    for alpha, role in ((0.0, "initial"), (1.0, "finetuned")):
        measured = {k: v for k, v in direct(workspace[role].model).items() if k != "eval/seconds"}
        assert outcome.metrics[alpha] == pytest.approx(measured), role
    assert outcome.best_alpha == max(outcome.alphas, key=lambda alpha: (outcome.scores[alpha], -alpha))


# --------------------------------------------------------------------------- refusals


def test_models_of_another_architecture_are_refused_naming_the_field(workspace, flickr8k_dir, capsys):
    config = copy.deepcopy(workspace["finetuned"].model.config)
    config.vision.layers = config.text.layers = 1
    other = save_model_file(workspace["root"] / "one-layer.pt", build_model(config))
    status = main(["wise-ft", "--initial", str(workspace["initial_file"]), "--finetuned", str(other),
                   "--suite", str(workspace["suite"]), "--tokenizer", str(workspace["finetuned"].tokenizer),
                   "--no-mlflow"])
    error = capsys.readouterr().err
    assert status == 2 and "different architectures" in error
    assert "model.vision.layers: 2 (initial) vs 1 (fine-tuned)" in error and "model.text.layers" in error


def test_models_with_other_tokenizers_are_refused(workspace, flickr8k_dir, capsys):
    other_tokenizer = train_bpe_tokenizer(["a dog runs on the grass"] * 8, vocab_size=300).save(
        workspace["root"] / "other-tokenizer.json")
    model = workspace["initial"].model
    save_training_state(workspace["root"] / "runs" / "retokenized" / "checkpoint_000001", model=model,
                        optimizer=torch.optim.SGD(model.parameters(), lr=0.0), step=1,
                        config={"data": {"tokenizer": str(other_tokenizer)}})
    status = main(["wise-ft", "--initial", str(workspace["root"] / "runs" / "retokenized"),
                   "--finetuned", str(workspace["finetuned"].run_dir), "--suite", str(workspace["suite"])])
    error = capsys.readouterr().err
    assert status == 2 and "different tokenizers" in error and "other-tokenizer.json" in error


def test_a_plain_state_dict_mixes_under_the_architecture_the_other_model_records(workspace):
    plain = workspace["root"] / "plain-state-dict.pt"
    torch.save(workspace["initial"].model.state_dict(), plain)  # no config: 64-wide heads and QuickGELU assumed
    initial, finetuned = resolve_pair(str(plain), str(workspace["finetuned"].run_dir),
                                      str(workspace["finetuned"].tokenizer))
    assert initial.model_config.vision.head_width == 64 and finetuned.model_config.vision.head_width == 32
    assert mixture_config(initial, finetuned) is finetuned.model_config
    assert mixture_config(finetuned, initial) is finetuned.model_config  # whichever side records it


@pytest.mark.parametrize("alphas, message", [("0,1.5", "1.5 is not in [0, 1]"),
                                             ("0.121,0.124", "would both be MLflow step 12")])
def test_bad_alphas_are_refused(workspace, alphas, message, capsys):
    status = main(["wise-ft", "--initial", "a", "--finetuned", "b", "--suite", str(workspace["suite"]),
                   "--alphas", alphas])
    assert status == 2 and message in capsys.readouterr().err
    with pytest.raises(ConfigError):
        check_alphas([])
