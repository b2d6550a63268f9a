"""Microsoft sandbox: a local, faithful fake of login.microsoftonline.com (Entra v2.0) and
graph.microsoft.com served over HTTPS on loopback. See README.md in this folder."""

from .client import SandboxControl, SandboxControlError
from .server import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_REDIRECT_URIS,
    PortInUseError,
    SandboxServer,
    create_app,
    main,
)
from .users import CONSUMER_TENANT_ID, CONTOSO_TENANT_ID, FABRIKAM_TENANT_ID, TEST_USERS, TestUser

__all__ = [
    "CONSUMER_TENANT_ID", "CONTOSO_TENANT_ID", "DEFAULT_CLIENT_ID", "DEFAULT_CLIENT_SECRET", "DEFAULT_REDIRECT_URIS",
    "FABRIKAM_TENANT_ID", "TEST_USERS", "PortInUseError", "SandboxControl", "SandboxControlError", "SandboxServer",
    "TestUser", "create_app", "main",
]
