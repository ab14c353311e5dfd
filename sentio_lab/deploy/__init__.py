"""Stage 7, deployment: export, the model registry, the decision service and paper trading."""
