"""Test session setup: OpenMP threads sleep when idle (set before torch loads; see fxq/cli.py)."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
