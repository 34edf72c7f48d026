"""The grid registry (grids/__init__.py says what a grid is)."""
from ..config import Registry

GRIDS = Registry("grid")
