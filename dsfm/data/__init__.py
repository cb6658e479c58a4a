"""Data: The Well and PDEBench formats, readers, statistics and validation."""

from dsfm.data.normalization import RMSNormalization, ZScoreNormalization
from dsfm.data.well import WellDataset, WellMetadata
from dsfm.data.well_format import BoundaryCondition

__all__ = ["BoundaryCondition", "RMSNormalization", "WellDataset", "WellMetadata",
           "ZScoreNormalization"]
