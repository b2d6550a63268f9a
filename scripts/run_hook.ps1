# Runs an azd hook's Python logic (scripts/<name>.py) on Windows. Usage: run_hook.ps1 preprovision.py
param([Parameter(Mandatory = $true)][string]$Hook)
$ErrorActionPreference = 'Stop'

# Needs PowerShell 7 (pwsh), as azure.yaml's `shell: pwsh` says; Windows PowerShell 5.1 is not used.
# The Python launcher first (`py -3`: the python.org installer's way, and it never opens the Microsoft
# Store stub that a bare `python` can be on a new Windows machine), then python, then python3.
$python = $null
$pyArgs = @()
if (Get-Command 'py' -ErrorAction SilentlyContinue) { $python = 'py'; $pyArgs = @('-3') }
else {
    foreach ($candidate in @('python', 'python3')) {
        if (Get-Command $candidate -ErrorAction SilentlyContinue) { $python = $candidate; break }
    }
}
if (-not $python) {
    Write-Error "$($Hook -replace '\.py$', ''): Python 3 is required (py -3, python or python3 on PATH)"
    exit 2
}

& $python @pyArgs (Join-Path $PSScriptRoot $Hook)
exit $LASTEXITCODE
