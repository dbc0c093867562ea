"""The package version, importable without importing the rest of Thresher."""

__version__ = "0.1.0"
