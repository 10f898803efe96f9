"""Record dict -> tensor: online standardization, one-hot categories, growing schema."""

from stream_trainer.features.encoder import OTHER_CATEGORY, FeatureEncoder
from stream_trainer.features.standardizer import RunningStandardizer

__all__ = ["OTHER_CATEGORY", "FeatureEncoder", "RunningStandardizer"]
