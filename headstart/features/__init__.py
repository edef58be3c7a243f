"""The frozen forward pass, run once per image and cached by content.

cache.py is the per-image feature cache and what is missing from it; engines.py runs the
backbone (LiteRT or TensorFlow); extraction.py is the extraction context that owns the engines
and extracts a shard into the cache; dataset.py assembles one dataset's features file from the
cache; streams.py reads it back, split by split, for training; encoding.py is how a feature
vector is stored.
"""
