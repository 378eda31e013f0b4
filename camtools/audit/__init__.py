"""The dataset audit: every image explained by an archive's service on Ray Data, and the classes that answer from
the wrong evidence found (``scripts/audit.py``; docs/audit.md). Never shipped in an archive's handler path: its actors
receive ``camserve`` and this package through Ray's runtime environment."""
