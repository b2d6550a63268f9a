# azd postprovision hook (Windows / PowerShell 7). Creates the token key ring and the webhook
# secret in Key Vault if they do not exist yet; never overwrites them. The logic lives in
# postprovision.py.
& (Join-Path $PSScriptRoot 'run_hook.ps1') -Hook 'postprovision.py'
exit $LASTEXITCODE
