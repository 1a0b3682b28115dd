"""A teacher-target cache (docs/scale.md): run the teachers once over the data (``hd cache-targets``), train
students many epochs from disk (``hd distill --targets-cache``) without loading a teacher.

- :mod:`~hdcli.cache.layout`: the header, the records, the index, and what defines a cache;
- :mod:`~hdcli.cache.write`: writing (resumable, one shard per process at a time);
- :mod:`~hdcli.cache.read`: the training loader: each epoch one view per image, its crop recomputed from the
  original image, its targets read from the cache.
"""
