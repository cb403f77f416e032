"""Evaluation: zero-shot classification, image-text retrieval, prompt templates; sharded over the training
ranks (gather) or run beside training in a Ray actor (background)."""
