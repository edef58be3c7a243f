"""Run directories, the registry's versions and champion, and reuse of identical runs."""
