"""fxq's graph passes, each usable on its own from Python."""
