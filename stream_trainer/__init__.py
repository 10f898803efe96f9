"""stream-trainer: online learning from streams with normalization that is safe at batch size 1."""

__version__ = "0.1.0"
__all__ = ["__version__"]
