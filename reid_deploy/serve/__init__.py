"""The search service (``reid serve``): searcher (the gallery shard), write-ahead log, batcher, service core,
and the HTTP adapter (app). Only ``app`` and ``command`` know of HTTP."""
