"""WiSE-FT (Wortsman et al. 2022): weight-space ensembles of a model and its fine-tuned version, each evaluated.

    theta(alpha) = (1 - alpha) * theta_initial + alpha * theta_finetuned

Fine-tuning gains on the target data and often loses robustness elsewhere; a mixture between the two weight
sets often keeps most of both. For each alpha the mixture is evaluated by the evaluation suite
(`SuiteMixtures`: clip_ray/driver/suite, features on Ray Data encoder actors) or by a training config's own
evaluation (`ConfigMixtures`: eval/evaluate.py's Evaluator on the config's data.val and zero-shot folder,
on the driver), the mixtures one after another in one Ray session. The best one by a selection score is
saved as a checkpoint directory the rest of clip-ray loads (`clip-ray eval DIR/best`, `model.init_from`),
and one MLflow run records it all: every metric once per alpha at step round(100 * alpha), so the MLflow
UI draws each as a curve over the ratio, and the best alpha with its metrics (`best/...`) at step 0.

The two models must compute the same function of their weights: the same architecture (`ModelConfig`
less what acts only in training or says nothing about the network: its training-only fields, name, gradient
checkpointing, patch dropout, initial temperature) and the same tokenizer (by SHA-256), and their weights the
same names and shapes; anything else is an `IncompatibleModelsError` naming what differs. A plain OpenAI-layout
state dict does not record its head width, activation or pad id: against a model that does, those are not
compared and the recording model's config builds the mixtures. Integer buffers (a ResNet's BatchNorm batch
counts) are counters, not weights: the fine-tuned model's are kept.

With a suite, the encoder actors load each mixture from OUTPUT/alphas: on a cluster of several nodes, OUTPUT
must be a folder every node sees (a shared mount), as a local model given to `clip-ray eval --suite` must be.

Output folder:

    wise_ft.csv, wise_ft.md, wise_ft.json   every metric per alpha, the score, the best; the models' identities
    alphas/alpha-0.50/                       a suite's results files for that mixture (and its model.pt when kept)
    best/                                    the best mixture: model.pt, training_state.pt, manifest.json + tokenizer

    mixing.py       which models mix, the ratios, mixing state dicts, saving a mixture
    evaluations.py  what scores a mixture: a suite (SuiteMixtures) or a training config's evaluation (ConfigMixtures)
    runner.py       the job: each alpha mixed and scored, the best chosen and saved, the results files, the MLflow run
"""

from clip_ray.driver.wise_ft.evaluations import ConfigMixtures, MixtureEvaluation, SuiteMixtures
from clip_ray.driver.wise_ft.mixing import (
    DEFAULT_ALPHAS, IncompatibleModelsError, build_mixture, check_alphas, check_compatible, mix_state_dicts,
    mixture_config, resolve_pair)
from clip_ray.driver.wise_ft.runner import WiseFtOutcome, results_table, wise_ft

__all__ = ["ConfigMixtures", "DEFAULT_ALPHAS", "IncompatibleModelsError", "MixtureEvaluation", "SuiteMixtures",
           "WiseFtOutcome", "build_mixture", "check_alphas", "check_compatible", "mix_state_dicts", "mixture_config",
           "resolve_pair", "results_table", "wise_ft"]
