"""Training: packing (data), the training loop (engine) and its speed levers (transforms), checkpoints, provenance, the stage's run()."""
