"""Patch data and normalisation for training and inference."""

from monai_iqt.data.normalise import NormalisationStats

__all__ = ["NormalisationStats"]
