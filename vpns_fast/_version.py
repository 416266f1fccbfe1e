"""The package version, in one place (read by the package, the metadata and `vpns info`)."""
__version__ = "0.1.0"
