"""Make ``datasets.load_dataset("gaia", ...)`` resolve to the GAIA builder.

``datasets`` has no public registry of builder names, and since 4.0 it refuses loading
scripts. ``load_dataset`` and ``load_dataset_builder`` find a dataset through the module-level
function ``datasets.load.dataset_module_factory``, so :func:`register` wraps that function:
the name ``"gaia"`` returns a module description pointing at :mod:`gaia_builder.builder`, and
every other name goes to the original function unchanged.

The wrapper skips the route through ``datasets.packaged_modules``, which would scan the
current directory for data files (changing the cache directory with whatever the directory
holds, or failing in an empty one) and send a request to count downloads.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import datasets.load

logger = logging.getLogger(__name__)

DATASET_NAME = "gaia"
BUILDER_MODULE = "gaia_builder.builder"

_WRAPPED_MARKER = "_gaia_original"


def builder_hash() -> str:
    """Hash the package sources, so that a code change never reuses a stale Arrow cache."""
    digest = hashlib.sha256()
    package_dir = Path(__file__).parent
    for path in sorted(package_dir.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _gaia_module(revision: Any) -> datasets.load.DatasetModule:
    builder_kwargs: dict[str, Any] = {"dataset_name": DATASET_NAME}
    if revision is not None:
        # load_dataset consumes its own revision argument; for gaia it names the revision of
        # the metadata repository on the Hub.
        builder_kwargs["revision"] = str(revision)
    return datasets.load.DatasetModule(BUILDER_MODULE, builder_hash(), builder_kwargs)


def register() -> None:
    """Route ``load_dataset("gaia")`` to the GAIA builder; calling it again changes nothing."""
    current = datasets.load.dataset_module_factory
    if hasattr(current, _WRAPPED_MARKER):
        return

    original: Callable[..., Any] = current

    @functools.wraps(original)
    def dataset_module_factory(path: str, revision: Any = None, *args: Any, **kwargs: Any) -> Any:
        if path == DATASET_NAME:
            return _gaia_module(revision)
        return original(path, revision, *args, **kwargs)

    setattr(dataset_module_factory, _WRAPPED_MARKER, original)
    datasets.load.dataset_module_factory = dataset_module_factory
    logger.debug("registered %r with datasets %s", DATASET_NAME, datasets.__version__)


def unregister() -> None:
    """Restore the original ``dataset_module_factory`` of ``datasets``."""
    current = datasets.load.dataset_module_factory
    original = getattr(current, _WRAPPED_MARKER, None)
    if original is not None:
        datasets.load.dataset_module_factory = original
