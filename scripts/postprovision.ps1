# azd postprovision hook (Windows / PowerShell). Creates the token key ring and the webhook
# secret in Key Vault if they do not exist yet; never overwrites them. The logic lives in
# postprovision.py.
$ErrorActionPreference = 'Stop'

$python = $null
foreach ($candidate in @('python', 'python3', 'py')) {
    if (Get-Command $candidate -ErrorAction SilentlyContinue) { $python = $candidate; break }
}
if (-not $python) {
    Write-Error 'postprovision: Python 3 is required (python, python3 or py on PATH)'
    exit 2
}

& $python (Join-Path $PSScriptRoot 'postprovision.py')
exit $LASTEXITCODE
