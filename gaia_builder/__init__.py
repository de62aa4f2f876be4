"""gaia: the GAIA remote-sensing vision-language dataset as a Hugging Face ``datasets`` dataset.

Importing this package registers the name ``"gaia"`` with ``datasets.load_dataset``.

Modules, one per stage:

- ``config``: the builder config and the fetch and image options it derives, with validation.
- ``metadata``: reading GAIA's JSON metadata files (four layouts) without type coercion.
- ``fetch``: the polite aiohttp fetcher: limits, retries, deadlines, content checks.
- ``limits``: per-host connection and rate limits shared by every process of a run.
- ``images``: decoding, resizing and encoding as img2dataset did for the GAIA paper.
- ``cache``: the per-URL cache of fetched bytes and outcomes, which makes builds resumable.
- ``pipeline``: runs fetch and image work for a sequence of rows and yields them in order.
- ``builder``: the ``datasets.GeneratorBasedBuilder`` and its features.
- ``registry``: makes ``load_dataset("gaia")`` resolve to the builder.
- ``export``: Parquet for the Hub viewer and img2dataset-style WebDataset shards.
- ``cli``: the ``gaia`` command.
"""

__version__ = "0.1.0"

from .registry import register

register()

__all__ = ["__version__", "register"]
