"""amldist: distributed asymmetric metric learning for instance-level image retrieval."""

__version__ = "0.1.0"
