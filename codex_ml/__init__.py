"""codex_ml: the library behind the codex-pipeline DVC stages."""

__version__ = "0.1.0"
