"""Evaluation: zero-shot classification, image-text retrieval, prompt templates."""
