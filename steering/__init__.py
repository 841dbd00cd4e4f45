"""Model-side half of persona-server: loading, vectors, the registry, steering hooks and the
generation engine. Nothing here imports ``app``."""
