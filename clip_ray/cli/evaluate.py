"""`clip-ray eval`: a saved model on a training config's evaluation data, or on a benchmark suite.

    clip-ray eval MODEL [--config CFG]              zero-shot and retrieval on the config's data (the Evaluator)
    clip-ray eval MODEL --suite SUITE.yaml          zero-shot, linear probes and retrieval, one MLflow run
"""

from __future__ import annotations

import argparse
import json
import sys

from clip_ray.cli.common import add_ray_arguments, add_tokenizer_arguments, print_mlflow_run, run_on_model

MODEL_HELP = ("a checkpoint directory, a run directory (its latest checkpoint), a model.pt or OpenAI-layout state "
              "dict file (--suite), or an MLflow model (runs:/ID/model, models:/NAME/VERSION, models:/ID) or run")


def add_eval_commands(groups: argparse._SubParsersAction) -> None:
    evaluate = groups.add_parser(
        "eval", help="evaluate a checkpoint or an MLflow model (a config's data, or a benchmark suite)",
        description="With --config (or nothing): zero-shot accuracy on data.zeroshot_dir and retrieval recall "
                    "(and loss) on data.val of the config. With --suite: every task of the suite (zero-shot, "
                    "linear probe, retrieval), features computed on Ray Data encoder actors; a table printed, "
                    "results.csv/.md/.json written and one MLflow run logged.")
    evaluate.add_argument("model", help=MODEL_HELP)
    source = evaluate.add_mutually_exclusive_group()
    source.add_argument("--config", default=None,
                        help="training YAML whose evaluation data to use (default: configs/demo-cpu.yaml)")
    source.add_argument("--suite", default=None, help="suite YAML (e.g. configs/suites/shared.yaml)")
    evaluate.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                          help="override config or suite values (values are YAML; repeatable), e.g. "
                               "--set defaults.batch_size=64 tasks.cifar10-zeroshot.images.max_per_class=100")
    evaluate.add_argument("--demo-data-dir", default="demo-data", help="demo data of a config with a demo section")
    evaluate.add_argument("--json", dest="json_path", default=None, help="also write the metrics to this file")
    suite = evaluate.add_argument_group("suite")
    suite.add_argument("--output", default=None,
                       help="folder for results.csv, results.md, results.json "
                            "(default: eval-results/<suite>-<model short id>)")
    suite.add_argument("--tracking-uri", default=None,
                       help="MLflow store to log to and to read an MLflow model from "
                            "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    suite.add_argument("--experiment", default=None, help="MLflow experiment (default: the suite's, clip-ray-eval)")
    suite.add_argument("--no-mlflow", action="store_true", help="write the results files only")
    add_tokenizer_arguments(suite)
    add_ray_arguments(evaluate)
    evaluate.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    if args.suite is not None:
        return run_suite(args)
    from clip_ray.cli.training import prepare_job_of
    from clip_ray.driver.evaluate_model import evaluate_model
    from clip_ray.eval.report import metrics_table
    from clip_ray.ray_session import ray_session

    job = prepare_job_of(args)
    with ray_session(args.ray_address, args.num_cpus):
        try:
            metrics = evaluate_model(job.config, args.model)
        except FileNotFoundError as err:
            print(f"clip-ray eval: {err}", file=sys.stderr)
            return 2
    print(metrics_table({"model": metrics}))
    print(json.dumps(metrics, indent=2, sort_keys=True))
    _write_json(args.json_path, metrics)
    return 0


def _write_json(path: str | None, metrics: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(metrics, f, indent=2, sort_keys=True)


def run_suite(args: argparse.Namespace) -> int:

    from clip_ray.config.suite import load_suite
    from clip_ray.driver.suite import evaluate_suite, model_short_id, prepare_suite
    from clip_ray.eval.report import suite_table
    from clip_ray.inference.models import resolve_model

    suite = prepare_suite(load_suite(args.suite, args.overrides))  # a ConfigError: one line, exit 2 (cli.main)
    status, model, outcome = run_on_model(
        "eval", args, lambda: resolve_model(args.model, args.tokenizer, args.tracking_uri, args.state_dict_activation),
        lambda model: evaluate_suite(suite, model, output=args.output, tracking_uri=args.tracking_uri,
                                     experiment=args.experiment, log_to_mlflow=not args.no_mlflow))
    if status:
        return status
    print(f"\nSuite {outcome.suite} on {model.location} ({outcome.seconds:.0f} s)")
    print(suite_table(outcome.rows, model_short_id(model)))
    print(f"Results: {outcome.output} ({', '.join(path.rsplit('/', 1)[-1] for path in outcome.files)})")
    if outcome.run_id:
        print_mlflow_run(outcome)
    _write_json(args.json_path, outcome.metrics)
    return 0
