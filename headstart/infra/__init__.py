"""Plumbing every stage stands on: atomic storage, downloads, archives, native log noise, the one Keras."""
