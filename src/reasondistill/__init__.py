"""reasondistill: distil reasoning from large teacher language models into small students."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("reasondistill")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
