"""The encoder: a Ray Data callable class that loads a model once per actor and embeds batches.

    dataset.map_batches(ClipEncoder, fn_constructor_kwargs={"model": resolved, "towers": ("image", "text")},
                        batch_size=256, compute=ray.data.ActorPoolStrategy(size=4), num_gpus=0.25)

Its input is the preprocessed batch format of clip_ray.data.stream.preprocess: "image"
uint8 (or already normalised float32) [N, 3, S, S] at the model's image size, centre-cropped
as `Preprocessor(train=False)` makes it, and "text" int64 [N, context_length] from the
model's tokenizer. Its output is every other column as it came (the inputs too with keep_inputs),
plus "image_embedding" and/or "text_embedding": [N, embed_dim] unit vectors in `dtype`. The features are normalised in
float32 after the tower (which may run under autocast) and only then cast, so a float16 row
is the float32 unit vector rounded once.

The same object works outside Ray Data (`encode_images`, `encode_texts`), which is how the
search command embeds its queries and how an evaluation can reuse it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from clip_ray.data.stream.preprocess import normalize_on_device
from clip_ray.inference.models import ResolvedModel
from clip_ray.model.precision import autocast_context

TOWERS = ("image", "text")
EMBEDDING_COLUMNS = {"image": "image_embedding", "text": "text_embedding"}
# What each tower reads from a batch.
INPUT_COLUMNS = {"image": "image", "text": "text"}


def inference_precision(precision: str, device: torch.device) -> str:
    """"auto": fp16 autocast on a GPU (its features differ from fp32's by about float16's own rounding),
    fp32 on a CPU (where half-precision matmuls are slow); anything else as given."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


class ClipEncoder:
    """Embeds images and/or texts with one model, loaded when the actor starts (see the module docstring)."""

    def __init__(self, model: ResolvedModel, towers: tuple[str, ...] = TOWERS, dtype: str = "float16",
                 precision: str = "auto", device: str | None = None, keep_inputs: bool = False):
        unknown = set(towers) - set(TOWERS)
        if unknown or not towers:
            raise ValueError(f"towers must be some of {TOWERS}, got {towers}")
        self.towers = tuple(towers)
        self.dtype = np.dtype(dtype)
        # Under Ray a GPU share makes CUDA visible to this actor; without one the CPU encodes.
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = inference_precision(precision, self.device)
        self.model = model.load(self.device)
        self.embed_dim = model.model_config.embed_dim
        self.keep_inputs = keep_inputs

    def _finish(self, features: torch.Tensor) -> np.ndarray:
        return F.normalize(features.float(), dim=-1).cpu().numpy().astype(self.dtype, copy=False)

    @torch.no_grad()
    def encode_images(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """[N, 3, S, S] uint8 pixels (or normalised float32) -> [N, embed_dim] unit vectors in `dtype`."""
        pixels = torch.as_tensor(images).to(self.device, non_blocking=True)
        pixels = normalize_on_device(pixels) if pixels.dtype == torch.uint8 else pixels.float()
        with autocast_context(self.precision, self.device.type):
            return self._finish(self.model.encode_image(pixels))

    @torch.no_grad()
    def encode_texts(self, tokens: np.ndarray | torch.Tensor) -> np.ndarray:
        """[N, context_length] token ids -> [N, embed_dim] unit vectors in `dtype`."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).to(self.device, non_blocking=True)
        with autocast_context(self.precision, self.device.type):
            return self._finish(self.model.encode_text(tokens))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = set(INPUT_COLUMNS.values())  # pixels and tokens are heavy: passed on only when asked for
        out = {name: column for name, column in batch.items() if self.keep_inputs or name not in inputs}
        if "image" in self.towers:
            out[EMBEDDING_COLUMNS["image"]] = self._encode_or_empty(self.encode_images, batch["image"])
        if "text" in self.towers:
            out[EMBEDDING_COLUMNS["text"]] = self._encode_or_empty(self.encode_texts, batch["text"])
        return out

    def _encode_or_empty(self, encode, column: np.ndarray) -> np.ndarray:
        if len(column) == 0:
            return np.zeros((0, self.embed_dim), dtype=self.dtype)
        return encode(column)
