"""The python_function flavor of a logged CLIP: images and/or texts in, unit-norm embeddings out.

The pt2 pytorch flavor (clip_ray.tracking.export) takes two tensors and has no pyfunc flavor, so
`mlflow models serve`, `mlflow.pyfunc.load_model` and MLflow's batch tools could not use it. This
module adds one to the same model folder:

    clip/clip.json    the architecture (ModelConfig) and the tokenizer's file name
    clip/<tokenizer>  the tokenizer the model was trained with (tokenizer.json or CLIP's merges)
    code/clip_ray/    this package, so an environment with the model's requirements.txt serves it
                      without clip-ray installed (MLflow puts code/ first on sys.path)

Nothing is unpickled when it loads: MLflow imports the loader module named in MLmodel (this one)
and calls `_load_pyfunc`, which builds the CLIP from clip.json and fills it with the weights of the
torch.export program beside it (data/model.pt2), read by torch.export.load once MLflow's check has
found the archive free of pickles (only JSON and what torch's weights_only unpickler accepts).

Input, one item per row, every column optional (a DataFrame, a dict of lists or a list of dicts):

    image   an encoded image (JPEG, PNG, WebP ...): bytes, or a base64 string (what JSON carries)
    pixels  an image preprocessed already: float [3, S, S] (nested lists or an array)
    text    a caption

Output: a DataFrame with `image_embedding` (when image or pixels was given) and `text_embedding`
(when text was), float32 arrays of unit norm; None in a row that had no such input. Images are
preprocessed as clip-ray's evaluation does (centre square, bicubic to S, CLIP's mean and std) and
texts tokenized with the bundled tokenizer, so the embeddings are those of the checkpoint.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import AnyType, Array

from clip_ray.config import ModelConfig, from_dict, to_dict
from clip_ray.data.formats.samples import BadSample, Sample
from clip_ray.data.stream.preprocess import Preprocessor, normalize
from clip_ray.model.clip import CLIP, build_model
from clip_ray.model.tokenizer import Tokenizer, load_tokenizer

LOADER_MODULE = __name__
DATA_DIR = "clip"  # the pyfunc flavor's data folder inside the model
CODE_DIR = "code"
SETTINGS_FILE = "clip.json"
PROGRAM_FILE = "data/model.pt2"  # where mlflow.pytorch puts the torch.export program
IMAGE, PIXELS, TEXT = "image", "pixels", "text"
IMAGE_EMBEDDING, TEXT_EMBEDDING = "image_embedding", "text_embedding"
DEFAULT_BATCH_SIZE = 64


# --------------------------------------------------------------------------- writing the flavor


def input_schema() -> Schema:
    return Schema([
        ColSpec(DataType.string, IMAGE, required=False),  # string, not binary: a row may have no image
        # Any: MLflow's check of nested arrays refuses numpy arrays and costs a pandas Series per image row;
        # predict checks the shape itself.
        ColSpec(AnyType(), PIXELS, required=False),
        ColSpec(DataType.string, TEXT, required=False),
    ])


def signature() -> ModelSignature:
    output = Schema([ColSpec(Array(DataType.float), IMAGE_EMBEDDING, required=False),
                     ColSpec(Array(DataType.float), TEXT_EMBEDDING, required=False)])
    return ModelSignature(inputs=input_schema(), outputs=output)


def input_example(image_size: int) -> pd.DataFrame:
    """Two rows with an image (a PNG, base64 as a JSON request carries it) and a caption each."""
    import io

    from PIL import Image

    rows = []
    for colour, caption in (((200, 30, 30), "a red square"), ((30, 30, 200), "a blue square")):
        buffer = io.BytesIO()
        Image.new("RGB", (image_size, image_size), colour).save(buffer, format="PNG")
        rows.append({IMAGE: base64.b64encode(buffer.getvalue()).decode("ascii"), TEXT: caption})
    return pd.DataFrame(rows)


def add_pyfunc_flavor(path: str | Path, mlflow_model: Model, model_config: ModelConfig, tokenizer: Tokenizer) -> None:
    """Adds the flavor to a model folder that mlflow.pytorch saved as pt2 at `path` (and rewrites MLmodel):
    the tokenizer and the architecture, this package's code, the pyfunc signature and an input example."""
    from mlflow.models.utils import _save_example  # what log_model(input_example=...) calls; no public form
    from mlflow.pyfunc import add_to_model

    path = Path(path)
    if not (path / PROGRAM_FILE).is_file():
        raise FileNotFoundError(f"{path / PROGRAM_FILE}: the pyfunc flavor reads the weights of this program")
    data = path / DATA_DIR
    data.mkdir()
    tokenizer_file = tokenizer.save(data)
    settings = {"model_config": to_dict(model_config), "tokenizer": tokenizer_file.name}
    (data / SETTINGS_FILE).write_text(json.dumps(settings, indent=1))
    package = Path(__file__).resolve().parents[1]
    shutil.copytree(package, path / CODE_DIR / package.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))

    # One signature per model: the pyfunc one, what serving checks requests against (the pytorch flavor's
    # tensor inputs stay described in the metadata).
    mlflow_model.signature = signature()
    _save_example(mlflow_model, input_example(model_config.vision.image_size), str(path))
    add_to_model(mlflow_model, loader_module=LOADER_MODULE, data=DATA_DIR, code=CODE_DIR,
                 python_env="python_env.yaml", conda_env="conda.yaml",
                 model_config={"device": None, "batch_size": DEFAULT_BATCH_SIZE})
    mlflow_model.metadata = {**(mlflow_model.metadata or {}), "tokenizer": f"{DATA_DIR}/{tokenizer_file.name}"}
    mlflow_model.save(str(path / "MLmodel"))


# --------------------------------------------------------------------------- serving


def load_pickle_free_program(path: str | Path) -> torch.export.ExportedProgram:
    """torch.export.load of a .pt2 archive, after MLflow's check that every record in it is JSON or what
    torch's weights_only unpickler accepts (torch.export.load itself unpickles with weights_only=False)."""
    from mlflow.pytorch import _validate_pt2_archive_is_pickle_free  # MLflow's own check before it loads pt2

    _validate_pt2_archive_is_pickle_free(str(path))
    return torch.export.load(path)


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> "ClipEmbedder":
    """MLflow's entry point: the flavor's data folder (clip/) -> the model that predicts."""
    data = Path(data_path)
    settings = json.loads((data / SETTINGS_FILE).read_text())
    architecture = from_dict(ModelConfig, settings["model_config"])
    options = model_config or {}
    device = (options.get("device") or os.environ.get("MLFLOW_DEFAULT_PREDICTION_DEVICE")
              or ("cuda" if torch.cuda.is_available() else "cpu"))
    program = load_pickle_free_program(data.parent / PROGRAM_FILE)
    # The program wraps the CLIP as `clip` (clip_ray.tracking.export._ExportedClip).
    weights = {name.removeprefix("clip."): tensor.detach().float()
               for name, tensor in program.state_dict.items()}
    with torch.device("meta"):
        clip = build_model(architecture)
    clip.load_state_dict(weights, assign=True)  # strict: a missing or unexpected tensor is named
    tokenizer = load_tokenizer(data / settings["tokenizer"], architecture.text.context_length)
    return ClipEmbedder(clip.to(device).eval(), tokenizer, int(options.get("batch_size") or DEFAULT_BATCH_SIZE))


class ClipEmbedder:
    """The loaded flavor: predict() turns rows of images and texts into embeddings (see the module docstring)."""

    def __init__(self, clip: CLIP, tokenizer: Tokenizer, batch_size: int = DEFAULT_BATCH_SIZE):
        self.clip = clip
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = next(clip.parameters()).device
        config = clip.config
        self.image_size = config.vision.image_size
        self.preprocessor = Preprocessor(self.image_size, config.text.context_length, tokenizer, train=False)

    def predict(self, model_input: Any, params: dict | None = None) -> pd.DataFrame:
        rows = _as_frame(model_input)
        if not any(column in rows for column in (IMAGE, PIXELS, TEXT)):
            raise _bad_input(f"no {IMAGE!r}, {PIXELS!r} or {TEXT!r} column in the input (columns: {list(rows)})")
        out = pd.DataFrame(index=rows.index)
        images = self._image_rows(rows)
        if images is not None:
            out[IMAGE_EMBEDDING] = self._embed(images, len(rows), self._encode_images)
        if TEXT in rows:
            texts = _present(rows[TEXT])
            wrong = {position: type(text).__name__ for position, text in texts.items() if not isinstance(text, str)}
            if wrong:
                raise _bad_input(f"{TEXT!r} must be a string; rows (position: type) {dict(list(wrong.items())[:10])}")
            out[TEXT_EMBEDDING] = self._embed(texts, len(rows), self._encode_texts)
        empty = [str(i) for i, row in out.iterrows() if all(value is None for value in row)]
        if empty:
            raise _bad_input(f"rows {', '.join(empty[:10])} have no image, pixels or text")
        return out.reset_index(drop=True)

    def _image_rows(self, rows: pd.DataFrame) -> dict[int, np.ndarray] | None:
        """Row position -> normalised float32 [3, S, S], from the image and the pixels columns."""
        if IMAGE not in rows and PIXELS not in rows:
            return None
        encoded = _present(rows[IMAGE]) if IMAGE in rows else {}
        given = _present(rows[PIXELS]) if PIXELS in rows else {}
        both = sorted(set(encoded) & set(given))
        if both:
            raise _bad_input(f"rows {both[:10]} give both {IMAGE!r} and {PIXELS!r}: give one image per row")
        images = {position: self._preprocess(position, value) for position, value in encoded.items()}
        images.update({position: self._pixels(position, value) for position, value in given.items()})
        return images

    def _preprocess(self, position: int, value: Any) -> np.ndarray:
        data = _image_bytes(position, value)
        try:  # the evaluation's transform: centre square, bicubic to S x S
            hwc = self.preprocessor.image(Sample(key=f"row {position}", image=data, caption=""))
        except BadSample as bad:
            raise _bad_input(f"row {position}: {IMAGE!r} is not a usable image ({bad})") from None
        return normalize(hwc.transpose(2, 0, 1)[None])[0]

    def _pixels(self, position: int, value: Any) -> np.ndarray:
        pixels = np.asarray(value, dtype=np.float32)
        expected = (3, self.image_size, self.image_size)
        if pixels.shape != expected:
            raise _bad_input(f"row {position}: {PIXELS!r} has shape {pixels.shape}, this model takes {expected} "
                             "(normalised as clip-ray's evaluation does); or send the encoded image as 'image'")
        return pixels

    def _embed(self, items: dict[int, Any], num_rows: int, encode) -> pd.Series:
        """Encodes the present items in batches; None for the rows without one."""
        positions = sorted(items)
        embedded: dict[int, np.ndarray] = {}
        for start in range(0, len(positions), self.batch_size):
            chunk = positions[start:start + self.batch_size]
            embedded.update(zip(chunk, encode([items[position] for position in chunk])))
        # An object Series of arrays: a plain list of equal-length arrays would become a 2-D block.
        return pd.Series([embedded.get(position) for position in range(num_rows)], dtype=object)

    @torch.inference_mode()
    def _encode_images(self, images: list[np.ndarray]) -> np.ndarray:
        batch = torch.from_numpy(np.stack(images)).to(self.device)
        return self.clip.encode_image(batch).float().cpu().numpy()

    @torch.inference_mode()
    def _encode_texts(self, texts: list[str]) -> np.ndarray:
        tokens = self.preprocessor.text(texts)
        return self.clip.encode_text(torch.from_numpy(tokens).to(self.device)).float().cpu().numpy()


def _as_frame(model_input: Any) -> pd.DataFrame:
    if isinstance(model_input, pd.DataFrame):
        frame = model_input
    elif isinstance(model_input, dict):
        frame = pd.DataFrame({name: list(values) if not isinstance(values, str) else [values]
                              for name, values in model_input.items()})
    elif isinstance(model_input, list):
        frame = pd.DataFrame(model_input)
    else:
        raise _bad_input(f"expected a DataFrame, a dict of columns or a list of rows, got {type(model_input).__name__}")
    return _row_per_item(frame.reset_index(drop=True))


def _row_per_item(frame: pd.DataFrame) -> pd.DataFrame:
    """MLflow's signature check turns a dict of string lists ({"text": ["a dog", "a cat"]}) into ONE row that holds
    the lists; a caption or an encoded image is never a list, so such a row is spread back to a row per item."""
    if len(frame) != 1 or PIXELS in frame:
        return frame
    cells = {name: frame[name].iloc[0] for name in frame.columns}
    if not any(isinstance(cell, (list, tuple, np.ndarray)) for cell in cells.values()):
        return frame
    lengths = {name: len(cell) if isinstance(cell, (list, tuple, np.ndarray)) else None for name, cell in cells.items()}
    if None in lengths.values() or len(set(lengths.values())) != 1:
        raise _bad_input(f"columns given as lists must all be lists of one length, got {lengths}")
    return pd.DataFrame({name: list(cell) for name, cell in cells.items()})


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _present(column: pd.Series) -> dict[int, Any]:
    """Row position -> value for the rows that have one."""
    return {position: value for position, value in enumerate(column) if not _missing(value)}


def _image_bytes(position: int, value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        text = value.split(",", 1)[1] if value.startswith("data:") else value  # a data: URL's payload
        try:
            return base64.b64decode(text, validate=False)
        except (binascii.Error, ValueError) as err:
            raise _bad_input(f"row {position}: {IMAGE!r} is a string but not base64 ({err})") from None
    raise _bad_input(f"row {position}: {IMAGE!r} must be bytes or a base64 string, not {type(value).__name__}")


def _bad_input(message: str) -> MlflowException:
    """An error `mlflow models serve` answers with HTTP 400 and this message."""
    return MlflowException.invalid_parameter_value(message)
