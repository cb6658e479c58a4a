"""dsfm: pretraining scientific foundation models with DeepSpeed."""

__version__ = "0.1.0"


def subprocess_env(base=None) -> dict:
    """A copy of `base` (default: this process's environment) with the directory holding dsfm
    first on PYTHONPATH, so that Python subprocesses (readers, checks, benchmark ranks) import
    this dsfm even when it is run from a checkout rather than installed."""
    import os

    env = dict(os.environ if base is None else base)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env
