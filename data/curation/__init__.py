"""Data curation pipeline (``mmfm data curate RECIPE.yaml``): sources -> normalize ->
quality / language / safety filters -> exact + MinHash-LSH dedup -> tokenizer -> mixture ->
curated corpus + report. See docs/data.md.

Modules: ``recipe`` (typed YAML recipes), ``sources`` (readers), ``filters`` (stages),
``minhash`` (signatures, LSH, union-find), ``process`` / ``dedup`` / ``mixture`` (the three
pipeline stages), ``report``, ``pipeline`` (``curate``, executors, restart).
Import names from their modules, e.g. ``from mmfm.data.curation.pipeline import curate``.
"""
