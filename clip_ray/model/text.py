"""CLIP's text tower: a causally masked Transformer read out at the end-of-text token.

`CLIP` inherits this class rather than holding it as a child, so the text
tower's parameters sit at the top level of the state dict (`token_embedding`,
`transformer.resblocks.N`, `ln_final`, `text_projection`), exactly where
OpenAI's checkpoints put them. On its own the class is a complete text encoder.
"""

from __future__ import annotations

import torch
from torch import nn

from clip_ray.config import TextConfig
from clip_ray.model.layers import Transformer, compute_dtype, embedding_head


def end_of_text_positions(tokens: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Index of the last non-pad token in each row (0 for an all-pad row).

    With OpenAI's tokenizer this is the EOT token (id 49407); written without
    assuming EOT has the largest id, so trained tokenizers work too.
    """
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    return ((tokens != pad_token_id) * positions).argmax(dim=1)


class TextTransformer(nn.Module):
    def __init__(self, config: TextConfig, embed_dim: int, activation: str):
        super().__init__()
        width = config.width
        self.pad_token_id = config.pad_token_id
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, width))
        # The causal mask comes from SDPA's is_causal, so no mask buffer enters the state dict.
        self.transformer = Transformer.for_tower(config, activation, causal=True)
        self.ln_final, self.text_projection = embedding_head(width, embed_dim)
        self.init_text_parameters()

    @torch.no_grad()
    def init_text_parameters(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)
        self.transformer.init_parameters()

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids (T <= context_length) -> unnormalised [B, embed_dim] features."""
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        # Embeddings come out float32 even under autocast; the stream runs in the compute dtype (see LayerNorm).
        x = self.transformer(x.to(compute_dtype(x)))
        eot = end_of_text_positions(tokens, self.pad_token_id)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        return self.ln_final(x) @ self.text_projection

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_features(tokens)
