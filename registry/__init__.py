"""Registry side: training, export, quantization, evaluation, MLflow registration (needs torch)."""
