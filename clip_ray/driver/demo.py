"""The job that runs when `python jobs/train.py` (or `make demo`) gets no arguments.

It needs nothing downloaded: configs/demo-cpu.yaml has a `demo:` section, and
from it this module

  1. draws the demo data (clip_ray.data.demo.synthetic) into ./demo-data: coloured
     shapes with varied captions, some colour-shape combinations held out;
  2. points the config's data section at it, with a BPE to be trained on its
     captions (`data.tokenizer: bpe:N`, see clip_ray.driver.prepare).

The caller then trains as for any config and prints `demo_report`: zero-shot
accuracy on the held-out combinations (which the model saw only as separate
words) with chance beside it, and retrieval recall, before and after training.
Data and tokenizer are reused when an earlier run made them for the same config.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from clip_ray.config import Config, ConfigError, SourceConfig
from clip_ray.data.demo.synthetic import DemoDataset, generate_demo_data
from clip_ray.eval.report import metrics_table

log = logging.getLogger("clip_ray.demo")

DEFAULT_DATA_DIR = "demo-data"
CONFIG_NAME = "demo-cpu.yaml"


def default_config_path() -> Path:
    """configs/demo-cpu.yaml of the checkout this package runs from."""
    path = Path(__file__).resolve().parents[2] / "configs" / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"the default config {path} is missing (is clip_ray installed outside its "
                          "repository?); pass --config")
    return path


def fill_demo_config(config: Config, dataset: DemoDataset) -> Config:
    """A copy of `config` whose empty data fields point at the demo data; set ones are kept.

    Without a tokenizer it gets 'bpe:<model.text.vocab_size>', trained on the demo
    captions when the job prepares its config (clip_ray.driver.prepare).
    """
    config = copy.deepcopy(config)
    data = config.data
    if not data.train:
        data.train = [SourceConfig(path=str(Path(dataset.root) / "train"), format="webdataset")]
    if not data.val:
        data.val = [SourceConfig(path=str(Path(dataset.root) / "val"), format="webdataset")]
    data.zeroshot_dir = data.zeroshot_dir or dataset.zeroshot_dir
    data.tokenizer = data.tokenizer or f"bpe:{config.model.text.vocab_size}"
    return config


def prepare_demo(config: Config, data_dir: str | Path = DEFAULT_DATA_DIR) -> tuple[Config, DemoDataset]:
    """Generates (or reuses) the data of config.demo; returns the config pointing at it, and the data."""
    if config.demo is None:
        raise ConfigError("demo: the config has no demo section, so there is no demo data to make")
    log.info("demo data in %s (reused when it matches the config)", Path(data_dir).absolute())
    dataset = generate_demo_data(data_dir, config.demo)
    return fill_demo_config(config, dataset), dataset


def demo_report(before: dict, after: dict, dataset: DemoDataset) -> str:
    """The before/after table under a heading that says what the zero-shot classes are."""
    heading = (f"Zero-shot on the {len(dataset.class_names)} held-out colour-shape combinations (never shown "
               f"in training; chance {dataset.chance_level:.3f}), retrieval on {dataset.config.num_val} "
               "validation pairs:")
    return heading + "\n" + metrics_table({"before": before, "after": after})
