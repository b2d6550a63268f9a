"""Outlook / Microsoft 365 mailbox connector: the app's own package (framework-agnostic core).

``function_app.py`` and ``shared.blueprints`` adapt Azure Functions triggers to calls into the
modules here; nothing in this package outside ``blueprints`` imports ``azure.functions``.
"""

#: The package's version (pyproject.toml's, checked by a test); the OpenAPI document's ``info.version``.
__version__ = "0.1.0"
