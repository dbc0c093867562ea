"""Thresher: rejection-sampling training of language models, composed from plugins.

Third-party plugins import :data:`hookimpl` from here::

    import thresher

    @thresher.hookimpl
    def register_scorers(register):
        register(MyScorer)
"""

from thresher.core.hookspecs import hookimpl
from thresher.version import __version__

__all__ = ["__version__", "hookimpl"]
