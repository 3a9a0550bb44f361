"""Example models and data that ship with fxq (nothing is downloaded)."""
