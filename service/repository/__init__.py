"""Where models come from: the MLflow registry and the local cache (`artifact`), isolated
loading in a child process (`isolation`), the check that a version reproduces its registered
scores on this host (`reproduction`), the repository of loaded versions (`model_repository`)
and the watcher that follows aliases (`watcher`)."""
