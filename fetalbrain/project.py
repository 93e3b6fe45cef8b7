"""Where the project lies and its version: a leaf that every layer may import (the package's ``__init__`` also
registers the Hydra resolvers, which read run folders)."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
__version__ = "0.1.0"
