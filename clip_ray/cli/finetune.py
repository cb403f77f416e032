"""clip-ray wise-ft: weight-space ensembles of a model and its fine-tuned version, each evaluated.

    clip-ray wise-ft --initial A --finetuned B --suite SUITE.yaml [--alphas 0,0.25,0.5,0.75,1] [--output DIR]
    clip-ray wise-ft --initial A --finetuned B --config RUN.yaml   (the run's own evaluation: data.val, zero-shot)
"""

from __future__ import annotations

import argparse
import sys

from clip_ray.cli.common import add_ray_arguments, add_tokenizer_arguments, print_mlflow_run

SOURCE_HELP = ("a checkpoint or run directory, a model.pt or OpenAI-layout state dict file, or an MLflow model "
               "(runs:/ID/model, models:/NAME/VERSION, models:/ID) or run, local or a URI")


def parse_alphas(text: str) -> list[float]:
    """'0,0.1,0.5,1' -> [0.0, 0.1, 0.5, 1.0]; the range is checked by the job (clip_ray.driver.wise_ft)."""
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of numbers, e.g. 0,0.25,0.5,0.75,1")


def add_wise_ft_commands(groups: argparse._SubParsersAction) -> None:
    command = groups.add_parser(
        "wise-ft", help="mix a model with its fine-tuned version (WiSE-FT), evaluate each mixture, keep the best",
        description="WiSE-FT (Wortsman et al. 2022): for each alpha the weights (1 - alpha) * initial + alpha * "
                    "fine-tuned, evaluated by a suite (--suite) or a training config's evaluation (--config). A "
                    "table is printed; OUTPUT gets wise_ft.csv/.md/.json, each alpha's results and the best "
                    "mixture as a checkpoint (OUTPUT/best, loadable by clip-ray eval/embed and model.init_from); "
                    "one MLflow run holds every metric per alpha (at step round(100 * alpha)) and the best.")
    command.add_argument("--initial", required=True,
                         help=f"the model fine-tuning started from (alpha 0): {SOURCE_HELP}")
    command.add_argument("--finetuned", required=True,
                         help="the fine-tuned model (alpha 1): any source --initial takes")
    source = command.add_mutually_exclusive_group(required=True)
    source.add_argument("--suite", default=None, help="suite YAML (e.g. configs/suites/flickr8k-retrieval.yaml)")
    source.add_argument("--config", default=None,
                        help="training YAML whose evaluation (data.val retrieval and loss, data.zeroshot_dir) to use")
    command.add_argument("--alphas", type=parse_alphas, default=None,
                         help="mixing ratios in [0, 1], comma-separated (default: 0,0.1,...,1)")
    command.add_argument("--select", default=None, metavar="TASK/METRIC",
                         help="the metric the best alpha maximises, e.g. flickr8k-retrieval/text_to_image_R@5 "
                              "(default: the mean of each task's retrieval R@5 both ways and zero-shot top-1)")
    command.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                         help="override suite or config values (values are YAML; repeatable)")
    command.add_argument("--output", default=None,
                         help="results folder (default: wise-ft-results/<fine-tuned model's short id>)")
    command.add_argument("--keep-mixtures", action="store_true",
                         help="keep each mixture's model.pt under OUTPUT/alphas (suite only); the best is always "
                              "saved, as OUTPUT/best")
    add_tokenizer_arguments(command, "tokenizer of both models (default: the one each recorded; they must be the same)")
    command.add_argument("--demo-data-dir", default="demo-data", help="demo data of a config with a demo section")
    tracking = command.add_argument_group("MLflow")
    tracking.add_argument("--tracking-uri", default=None,
                          help="MLflow store to log to and to read MLflow models from "
                               "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    tracking.add_argument("--experiment", default=None, help="MLflow experiment (default: clip-ray-wise-ft)")
    tracking.add_argument("--no-mlflow", action="store_true", help="write the results files only")
    add_ray_arguments(command)
    command.set_defaults(run=run_wise_ft)


def mixture_evaluation(args: argparse.Namespace, tokenizer_path: str):
    """SuiteMixtures or ConfigMixtures, checked and prepared before Ray starts (a ConfigError: exit 2)."""
    from clip_ray.driver.wise_ft import ConfigMixtures, SuiteMixtures

    if args.suite is not None:
        from clip_ray.config.suite import load_suite
        from clip_ray.driver.suite import prepare_suite

        return SuiteMixtures(prepare_suite(load_suite(args.suite, args.overrides)), keep_mixtures=args.keep_mixtures)
    from clip_ray.cli.training import prepare_job_of
    from clip_ray.storage import is_uri

    # The config's model is not trained here: no initial weights to prepare. The models' tokenizer, so preparing
    # the config trains none (the evaluation uses the models' own either way).
    overrides = [*args.overrides, "model.init_from=null"]
    if not is_uri(tokenizer_path) and not tokenizer_path.startswith("runs:/"):
        overrides.append(f"data.tokenizer={tokenizer_path}")
    return ConfigMixtures(prepare_job_of(argparse.Namespace(**{**vars(args), "overrides": overrides})).config)


def run_wise_ft(args: argparse.Namespace) -> int:

    from clip_ray.data.formats import DataError
    from clip_ray.driver.wise_ft import DEFAULT_ALPHAS, check_alphas, resolve_pair, results_table, wise_ft
    from clip_ray.inference.models import ModelSourceError
    from clip_ray.ray_session import ray_session

    alphas = check_alphas(args.alphas or DEFAULT_ALPHAS)  # a ConfigError: one line, exit 2 (cli.main)
    try:
        initial, finetuned = resolve_pair(args.initial, args.finetuned, args.tokenizer, args.tracking_uri,
                                          args.state_dict_activation)
    except ModelSourceError as err:
        print(f"clip-ray wise-ft: {err}", file=sys.stderr)
        return 2
    evaluation = mixture_evaluation(args, finetuned.tokenizer_path)
    with ray_session(args.ray_address, args.num_cpus):
        try:
            outcome = wise_ft(initial, finetuned, evaluation, alphas=alphas, output=args.output, select=args.select,
                              tracking_uri=args.tracking_uri, experiment=args.experiment,
                              log_to_mlflow=not args.no_mlflow)
        except (DataError, ModelSourceError) as err:
            print(f"clip-ray wise-ft: {err}", file=sys.stderr)
            return 2 if isinstance(err, ModelSourceError) else 1
    print(f"\nWiSE-FT of {initial.location} (alpha 0) and {finetuned.location} (alpha 1), {outcome.seconds:.0f} s")
    print(results_table(outcome))
    print(f"Best alpha {outcome.best_alpha:g} (score {outcome.scores[outcome.best_alpha]:.4f}, the mean of "
          f"{', '.join(outcome.selection)}): {outcome.best_model}")
    print(f"Results: {outcome.output} ({', '.join(path.rsplit('/', 1)[-1] for path in outcome.files)})")
    if outcome.run_id:
        print_mlflow_run(outcome)
    return 0
