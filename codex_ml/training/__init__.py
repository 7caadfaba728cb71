"""Training: packing (data), the Trainer-based engine, checkpoints, provenance, the stage's run()."""
