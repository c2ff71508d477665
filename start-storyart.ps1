<#
.SYNOPSIS
    Starts the StoryArt session service and the StoryArt frontend together; Ctrl+C stops both.

.DESCRIPTION
    Prepares Python, then hands over to launcher.py (next to this script), which does the real work.

    Python: creates the virtual environment .venv next to this script when it is missing (with Python 3.11
    or newer, found as 'py -3' on Windows, else 'python3' or 'python'), and installs requirements.txt into
    it when .venv is new or requirements.txt changed since the last install.

    launcher.py then:
      - refuses to start when the port is held by another program, and names it; when the holder is an
        earlier instance of this service, stops it and goes on;
      - starts the session service (app.py) and waits until /health answers;
      - starts 'npm run dev' in the frontend folder and waits until the dev server answers;
      - opens the browser, unless -NoBrowser;
      - on Ctrl+C, or when either of the two exits, stops both with all their child processes.

    Exit code: 0 after Ctrl+C, 1 when something failed (the reason is printed on one line).
    More options (timeouts): run launcher.py --help with the .venv Python.

.PARAMETER FrontendDir
    The StoryArt frontend folder, the one holding package.json. Default: $env:STORYART_FRONTEND_DIR.

.PARAMETER NoFrontend
    Start only the session service.

.PARAMETER NoBrowser
    Do not open a browser.

.PARAMETER Port
    Port of the session service. Default: $env:REDIS_API_PORT, else 7802.

.PARAMETER FrontendPort
    Port for the dev server, passed on as 'npm run dev -- --port N'. Default: the frontend's own setting
    (StoryArt's is 3000; Vite's default is 5173); the launcher waits for either.

.PARAMETER Help
    Show this help and exit.

.EXAMPLE
    .\start-storyart.ps1 -FrontendDir C:\src\StoryArt

    Windows: service on http://localhost:7802, frontend from C:\src\StoryArt, browser opened.

.EXAMPLE
    pwsh ./start-storyart.ps1 -FrontendDir ~/src/StoryArt -NoBrowser

    macOS or Linux with PowerShell 7.

.EXAMPLE
    .\start-storyart.ps1 -NoFrontend -Port 7803

    Only the session service, on port 7803.
#>
[CmdletBinding()]
param(
    [string]$FrontendDir = $env:STORYART_FRONTEND_DIR,
    [switch]$NoFrontend,
    [switch]$NoBrowser,
    [ValidateRange(1, 65535)]
    [int]$Port,
    [ValidateRange(1, 65535)]
    [int]$FrontendPort,
    [switch]$Help
)

Set-StrictMode -Version 3.0
# Exit codes are checked one by one. 'Stop' (perhaps inherited from a profile) would turn a warning that
# pip or Python writes to stderr into a terminating error in Windows PowerShell 5.1, and a non-zero exit
# code into one in PowerShell 7.3+.
$ErrorActionPreference = 'Continue'
$PSNativeCommandUseErrorActionPreference = $false

if ($Help) {
    Get-Help -Name $PSCommandPath -Detailed
    exit 0
}

function Test-IsWindows {
    # $IsWindows exists from PowerShell 6 on; Windows PowerShell 5.1 only ever runs on Windows.
    if ($PSVersionTable.PSVersion.Major -lt 6) {
        return $true
    }
    return [bool]$IsWindows
}

function Test-PythonVersion {
    # True when the given program (plus arguments) is Python 3.11 or newer.
    param([string]$Program, [string[]]$Arguments)
    $check = 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'
    try {
        $null = & $Program @Arguments -c $check 2>&1
    } catch {
        return $false  # it could not even be started
    }
    return ($LASTEXITCODE -eq 0)
}

function Find-Python {
    # Outputs the program and arguments of a Python 3.11+ interpreter; outputs nothing when there is none.
    $candidates = @()
    if (Test-IsWindows) {
        $candidates += , @('py', '-3')
    }
    $candidates += , @('python3')
    $candidates += , @('python')
    foreach ($candidate in $candidates) {
        $command = Get-Command -Name $candidate[0] -CommandType Application -ErrorAction SilentlyContinue |
            Select-Object -First 1
        if ($null -eq $command) {
            continue
        }
        $arguments = @($candidate | Select-Object -Skip 1)
        if (Test-PythonVersion -Program $command.Path -Arguments $arguments) {
            return @($command.Path) + $arguments
        }
    }
}

$root = $PSScriptRoot
$venvDir = Join-Path $root '.venv'
if (Test-IsWindows) {
    $venvPython = Join-Path (Join-Path $venvDir 'Scripts') 'python.exe'
} else {
    $venvPython = Join-Path (Join-Path $venvDir 'bin') 'python'
}
$requirements = Join-Path $root 'requirements.txt'
$marker = Join-Path $venvDir '.requirements-installed'

$venvIsNew = $false
if (-not (Test-Path -LiteralPath $venvPython)) {
    $python = @(Find-Python)
    if ($python.Count -eq 0) {
        Write-Host '[storyart] Error: Python 3.11 or newer was not found (tried py -3, python3, python). Install it and try again.'
        exit 1
    }
    Write-Host "[storyart] Creating the virtual environment $venvDir ..."
    $pythonExe = $python[0]
    $pythonArgs = @($python | Select-Object -Skip 1)
    & $pythonExe @pythonArgs -m venv $venvDir
    if (($LASTEXITCODE -ne 0) -or (-not (Test-Path -LiteralPath $venvPython))) {
        Write-Host '[storyart] Error: could not create .venv (on Debian or Ubuntu, install the python3-venv package).'
        exit 1
    }
    $venvIsNew = $true
} elseif (-not (Test-PythonVersion -Program $venvPython -Arguments @())) {
    Write-Host "[storyart] Error: $venvDir holds no working Python 3.11 or newer; delete that folder and run this script again."
    exit 1
}

if (Test-Path -LiteralPath $requirements) {
    $install = $venvIsNew -or (-not (Test-Path -LiteralPath $marker))
    if (-not $install) {
        $install = (Get-Item -LiteralPath $requirements).LastWriteTimeUtc -gt (Get-Item -LiteralPath $marker).LastWriteTimeUtc
    }
    if ($install) {
        Write-Host '[storyart] Installing requirements.txt into .venv ...'
        & $venvPython -m pip install --disable-pip-version-check -r $requirements
        if ($LASTEXITCODE -ne 0) {
            Write-Host '[storyart] Error: pip could not install requirements.txt (see above).'
            exit 1
        }
        Set-Content -LiteralPath $marker -Value (Get-Date).ToString('o') -Encoding Ascii
    }
} else {
    Write-Host "[storyart] Warning: no requirements.txt in $root; nothing installed."
}

$launcherArgs = @((Join-Path $root 'launcher.py'))
if ($FrontendDir) {
    $launcherArgs += @('--frontend-dir', $FrontendDir)
}
if ($NoFrontend) {
    $launcherArgs += '--no-frontend'
}
if ($NoBrowser) {
    $launcherArgs += '--no-browser'
}
if ($PSBoundParameters.ContainsKey('Port')) {
    $launcherArgs += @('--port', [string]$Port)
}
if ($PSBoundParameters.ContainsKey('FrontendPort')) {
    $launcherArgs += @('--frontend-port', [string]$FrontendPort)
}

& $venvPython @launcherArgs
exit $LASTEXITCODE
