"""Cold start: import ``function_app`` + index its functions vs importing the runtime deps alone.

Each figure is the median of fresh interpreter processes, measured inside the process with
``perf_counter`` around the imports (interpreter start-up excluded), alternating the two cases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench._stack import ROOT, machine, median, write_section

DEPS = ("import azure.functions, azure.identity, azure.keyvault.secrets, azure.data.tables, azure.storage.queue, "
        "msal, requests, cryptography.hazmat.primitives.ciphers.aead, jwt")
APP = "import function_app; function_app.app.get_functions()"
LAZY = ("import shared.service, shared.oauth, shared.graph, shared.send, shared.refresh, shared.messages, "
        "shared.secret_store, shared.crypto, shared.auth, msal, azure.data.tables, azure.storage.queue, "
        "azure.identity, azure.keyvault.secrets")
# Paid by the first invocation when telemetry is on (shared/telemetry.py builds its providers then), never by
# indexing; DEPS leaves these packages out although requirements.txt lists them, so the bar stays strict.
TELEMETRY = ("import azure.monitor.opentelemetry, azure.monitor.opentelemetry.exporter, opentelemetry.sdk.trace, "
             "opentelemetry.sdk.metrics, opentelemetry.instrumentation.requests, "
             "azure.core.tracing.ext.opentelemetry_span")
ENV = {
    "MS_CLIENT_ID": "x", "MS_CLIENT_SECRET": "x", "PUBLIC_BASE_URL": "http://localhost:7071",
    "AzureWebJobsStorage": "UseDevelopmentStorage=true", "AUTH_ISSUER": "i", "AUTH_AUDIENCE": "a",
    "AUTH_HS256_SECRET": "x" * 32,
    "TOKEN_ENCRYPTION_KEYS": '{"active":"k","keys":{"k":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}}',
}


def _time(stmt: str) -> float:
    code = f"import time\nt=time.perf_counter()\n{stmt}\nprint(time.perf_counter()-t)"
    env = dict(os.environ, **ENV, PYTHONDONTWRITEBYTECODE="0")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    return float(out.stdout.strip().splitlines()[-1])


def run(repeats: int = 11) -> dict[str, float]:
    _time(DEPS), _time(APP)  # warm the page cache and bytecode
    deps, app, after, otel = [], [], [], []
    for _ in range(repeats):
        deps.append(_time(DEPS))
        app.append(_time(APP))
        after.append(_time(APP + "; " + LAZY))
        otel.append(_time(APP + "; " + LAZY + "; " + TELEMETRY) - after[-1])
    res = {"deps_ms": median(deps) * 1e3, "app_ms": median(app) * 1e3, "app_plus_lazy_ms": median(after) * 1e3,
           "telemetry_first_use_ms": median(otel) * 1e3}
    res["ratio"] = res["app_ms"] / res["deps_ms"]
    res["ratio_incl_lazy"] = res["app_plus_lazy_ms"] / res["deps_ms"]
    write_section("Cold start", f"""
{machine()}; median of {repeats} fresh processes each.

| what | median |
|---|---|
| import the runtime dependencies (requirements.txt) | {res['deps_ms']:.0f} ms |
| import `function_app` + index its functions | {res['app_ms']:.0f} ms |
| the same, plus every module the first invocations import lazily | {res['app_plus_lazy_ms']:.0f} ms |
| OpenTelemetry + the Azure Monitor distro (first invocation, telemetry on) | +{res['telemetry_first_use_ms']:.0f} ms |

**Ratio (app ÷ dependencies): {res['ratio']:.2f}×** — bar 1.1×. Heavy SDKs are imported inside the
handlers, so indexing does not pay for them; the first invocation that needs them does
(ratio including those lazy imports: {res['ratio_incl_lazy']:.2f}×). Telemetry (shared/telemetry.py) is
configured inside the first invocation, so indexing never imports OpenTelemetry; with
`TELEMETRY_EXPORTER=off` (or no connection string) it is never imported at all.
""")
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    run()
