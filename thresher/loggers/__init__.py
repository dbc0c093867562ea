"""Built-in loggers: ``jsonl`` (``metrics.jsonl``, always on) and ``tensorboard``."""
