"""normsurgeon's version, in a module of its own: modules that record it import it from here, not from the
package ``normsurgeon``, whose lazy attributes (``convert``, ``verify``, ``load``...) import most of the
package back.

>>> import normsurgeon
>>> normsurgeon.__version__ == __version__
True
"""
__version__ = "0.1.0"
