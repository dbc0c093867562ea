"""Thresher: rejection-sampling training of language models, composed from plugins.

Third-party plugins import :data:`hookimpl` from here::

    import thresher

    @thresher.hookimpl
    def register_scorers(register):
        register(MyScorer)
"""

from thresher.core.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl"]
