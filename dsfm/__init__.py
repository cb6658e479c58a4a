"""dsfm: pretraining scientific foundation models with DeepSpeed."""

__version__ = "0.1.0"
