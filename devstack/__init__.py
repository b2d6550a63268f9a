"""Local development stack: Microsoft sandbox, Azurite launcher and a dev Functions host.

Never deployed (excluded by ``.funcignore``). Nothing in ``shared/`` imports from here.
"""
