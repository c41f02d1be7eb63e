"""Real dataset formats and layout (SfM-120k, revisited Oxford/Paris, R1M distractors)."""
