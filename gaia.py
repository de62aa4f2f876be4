"""GAIA for Hugging Face ``datasets``.

On datasets 4.0 and newer, ``import gaia`` makes ``datasets.load_dataset("gaia", ...)`` work
from any directory. On datasets 3.6 this file also loads as a dataset script:
``datasets.load_dataset("path/to/gaia.py", trust_remote_code=True)``.
The builder lives in the installed package ``gaia_builder``.
"""

from gaia_builder import __version__, register
from gaia_builder.builder import Gaia
from gaia_builder.config import GaiaConfig

register()

__all__ = ["Gaia", "GaiaConfig", "__version__", "register"]
