"""Built-in loggers: ``jsonl`` (``metrics.jsonl``, always on), ``tensorboard``, ``wandb`` and ``mlflow``."""
