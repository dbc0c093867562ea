"""What a run leaves on disk: its directory (lock, marker), checkpoints, metrics and rollout records."""
