"""Azure Functions entry point (Python v2 model): registers the blueprints, nothing else."""

import azure.functions as func

from shared.blueprints import accounts, connect, health, mailbox, messages, notifications, send, tenants, timers
from shared.config import get_settings

get_settings()  # validate every setting at start-up; a bad one fails here, named

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

for blueprint in (health.bp, connect.bp, accounts.bp, send.bp, messages.bp, mailbox.bp, timers.bp,
                  notifications.bp, tenants.bp):
    app.register_functions(blueprint)
