# azd preprovision hook (Windows / PowerShell 7). Registers the resource providers the deployment
# needs but does not declare (Microsoft.App, for Flex Consumption). The logic lives in preprovision.py.
& (Join-Path $PSScriptRoot 'run_hook.ps1') -Hook 'preprovision.py'
exit $LASTEXITCODE
