"""Putting the cache on a model: block descriptions (``spec``), the forwards built from them (``blocks``),
hooks and pipeline call boundaries (``hooks``), family presets, random family models (``families``) and
discovery of new models. Imports ``core`` and ``perf``."""
