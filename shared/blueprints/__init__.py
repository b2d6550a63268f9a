"""Azure Functions blueprints: each translates triggers into calls on ``shared.service`` and back.

Only this package imports ``azure.functions``; heavy modules are imported inside handlers.
"""
