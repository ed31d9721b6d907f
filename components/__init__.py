"""kubetune's steps (one package each) and the config/storage/model code they share."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kubetune")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
