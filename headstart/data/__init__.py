"""The data: image files and where they come from, turned into a manifest of usable, split images.

sources.py resolves a run's source; folders.py and cifar10.py list labelled files from a folder
or the CIFAR-10 archive; manifest.py hashes, checks, de-duplicates and splits them; images.py
decodes one image.
"""
