"""`model.init_from`, prepared once on the driver before any worker starts.

The source is read and converted here (inference/init_source.py), fitted to the configured model
(model/initial_weights.py: shapes checked, positional embeddings resized) and checked against the run's
tokenizer. The result is written once as a .safetensors file in OpenAI's layout under
`<cluster.storage_path>/init-weights/`, named by its content, and `model.init_from` is pointed at it: every
worker reads one plain file (no Hugging Face conversion, MLflow download or TorchScript parsing 64 times
over), and a mismatch is a one-line error before Ray starts, not a worker's traceback.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path

from clip_ray.config import Config, ConfigError
from clip_ray.inference.init_source import check_tokenizer, read_initial_weights
from clip_ray.model.initial_weights import fit_initial_weights
from clip_ray.model.tokenizer import load_tokenizer
from clip_ray.storage import join, resolve, write_file

log = logging.getLogger("clip_ray.driver")

PREPARED_DIR = "init-weights"
# The tag that keeps what the user named, since model.init_from now names the prepared file.
SOURCE_TAG = "clip_ray.init_from"


def prepare_initial_weights(config: Config) -> None:
    """Reads, fits, checks and writes model.init_from's weights; changes `config` in place (init_from, and
    data.tokenizer where it was left empty and the source records one)."""
    from safetensors.torch import save

    model = config.model
    source, towers = model.init_from, model.init_from_towers
    with tempfile.TemporaryDirectory(prefix="clip-ray-init-") as scratch:
        weights = read_initial_weights(source, config.tracking.tracking_uri, Path(scratch))
        fitted, notes = fit_initial_weights(weights.state_dict, model, towers, weights.model_config)
        if not config.data.tokenizer:
            if weights.tokenizer.tokenizer_path is None:
                raise ConfigError(f"data.tokenizer: required, since model.init_from={source!r} records no tokenizer")
            config.data.tokenizer = _keep_tokenizer(weights.tokenizer.tokenizer_path, config)
            log.info("data.tokenizer: the one model.init_from was trained with, %s", config.data.tokenizer)
        if towers != "image":  # the text tower's weights read the run's token ids
            tokenizer = load_tokenizer(config.data.tokenizer, model.text.context_length)
            check_tokenizer(tokenizer, config.data.tokenizer, weights.tokenizer, source)
    payload = save(fitted, metadata={"source": str(source), "kind": weights.kind, "towers": towers})
    digest = hashlib.sha256(payload).hexdigest()[:16]
    target = join(join(config.cluster.storage_path, PREPARED_DIR), f"{digest}.safetensors")
    fs, inner = resolve(target)
    if fs.get_file_info(inner).type.name != "File":
        write_file(target, payload)
    log.info("model.init_from: %s (%s, %s tower%s, %d tensors%s) prepared as %s", source, weights.kind, towers,
             "s" if towers == "both" else "", len(fitted), "; " + "; ".join(notes) if notes else "", target)
    config.tracking.tags = {**config.tracking.tags, SOURCE_TAG: str(source), f"{SOURCE_TAG}.kind": weights.kind,
                            f"{SOURCE_TAG}.towers": towers, f"{SOURCE_TAG}.prepared": target,
                            **({f"{SOURCE_TAG}.resized": "; ".join(notes)} if notes else {})}
    model.init_from = target


def _keep_tokenizer(path: str, config: Config) -> str:
    """The source's tokenizer copied next to the prepared weights when it sits in a temporary download."""
    if not path.startswith(tempfile.gettempdir()):
        return path
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    target = Path(config.cluster.storage_path) / "tokenizers" / f"init-{digest}-{Path(path).name}"
    if Path(config.cluster.storage_path).is_absolute():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(Path(path).read_bytes())
        return str(target)
    raise ConfigError(f"data.tokenizer: model.init_from's tokenizer came from MLflow ({path}); give it as "
                      "data.tokenizer, a local file every worker can open")
