"""What the policy is trained on: the tasks (``tasks``: built-in arithmetic mixtures and JSONL files), the
Lightning DataModule that batches their queries (``datamodule``), and DAPO-style dynamic sampling
(``dynamic_sampling``: refill groups whose rewards have no spread)."""
