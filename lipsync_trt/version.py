"""The package version, in a module of its own that imports nothing (build.manifest and setup.py read it without
importing the package)."""
__version__ = "0.1.0"
