"""The `clip-ray` command line.

One argparse tree: `clip-ray GROUP COMMAND ...`. Each command group is added by
its own `add_<group>_commands(groups)` function, and each command sets `run`,
a function of the parsed arguments returning the exit status, so a new group
(train, eval, sweep, embed) is one more function and one more line in
`build_parser`. Heavy imports (Ray, torch) happen inside the `run` functions,
which keeps `clip-ray --help` fast. The scripts in jobs/ call `main` with their
command's words put in front.

    common.py    arguments several commands share (Ray, an input source, a config file)
    data.py      clip-ray data convert | curate
    training.py  clip-ray train | sweep
    evaluate.py  clip-ray eval (a config's evaluation data, or a benchmark suite)
    embed.py     clip-ray embed | search
    export.py    clip-ray export (OpenCLIP, Hugging Face, ONNX, safetensors)
    finetune.py  clip-ray wise-ft (weight-space ensembles of a fine-tuning)
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from clip_ray.cli.data import add_data_commands
from clip_ray.cli.embed import add_embed_commands, add_search_commands
from clip_ray.cli.evaluate import add_eval_commands
from clip_ray.cli.export import add_export_commands
from clip_ray.cli.finetune import add_wise_ft_commands
from clip_ray.cli.training import add_sweep_commands, add_train_commands
from clip_ray.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-ray", description="Distributed CLIP training on Ray.")
    groups = parser.add_subparsers(dest="group", required=True, metavar="GROUP")
    add_data_commands(groups)
    add_train_commands(groups)
    add_eval_commands(groups)
    add_sweep_commands(groups)
    add_embed_commands(groups)
    add_search_commands(groups)
    add_export_commands(groups)
    add_wise_ft_commands(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except ConfigError as err:
        # A config the command cannot run, found before Ray starts or by the job itself: one line, exit 2.
        name = " ".join(filter(None, (args.group, getattr(args, "command", None))))
        print(f"clip-ray {name}: {err}", file=sys.stderr)
        return 2
