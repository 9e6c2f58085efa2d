"""kiln-ray: serve one language model over an OpenAI-compatible API and train it while it serves."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kiln-ray")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"
