"""Training library (no Ray): epoch plans, the tuple step, optimiser set-up, validation, checkpoints.

`amldist.worker` runs these pieces inside Ray Train workers; see docs/TRAINING.md.
"""
