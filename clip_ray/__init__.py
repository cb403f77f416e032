"""clip-ray: distributed CLIP training on Ray, tracked in MLflow."""
