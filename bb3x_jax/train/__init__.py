"""Training: optimizer, explicit train state, the jitted step (loop and checkpoints to come)."""
