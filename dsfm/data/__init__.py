"""Data: The Well and PDEBench formats, readers, the prefetching loader, statistics, validation.

Names are imported on first use, so reader processes that only need the torch-free modules
(`well_format`, `index`, `windows`) do not pay for importing torch.
"""

import importlib

_EXPORTS = {
    "BoundaryCondition": "dsfm.data.well_format",
    "FieldVocabulary": "dsfm.data.fields",
    "PDEBenchDataset": "dsfm.data.pdebench",
    "RMSNormalization": "dsfm.data.normalization",
    "WellDataset": "dsfm.data.well",
    "WellLoader": "dsfm.data.prefetch",
    "WellMetadata": "dsfm.data.well",
    "ZScoreNormalization": "dsfm.data.normalization",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dsfm.data' has no attribute {name!r}")


def __dir__():
    return __all__
