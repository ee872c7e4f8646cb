@echo off
rem BAT OS launcher (Windows). One command does the set-up on first run.
rem   puter.bat [--demo] [--detach]   start the watchdog and kernel, open the chat client
rem   puter.bat status | stop | test | setup
rem   BATOS_MODEL: the code model set-up installs (auto, qwen2.5-coder-1.5b, qwen2.5-coder-0.5b, none)
setlocal EnableDelayedExpansion
cd /d "%~dp0"
if "%BATOS_VENV%"=="" set "BATOS_VENV=%~dp0.venv"
if "%BATOS_ENDPOINT%"=="" set "BATOS_ENDPOINT=tcp://127.0.0.1:5555"
if "%BATOS_EXTRAS%"=="" set "BATOS_EXTRAS=llama,dev"
if "%PYTHON%"=="" set "PYTHON=py -3.11"
set "PY=%BATOS_VENV%\Scripts\python.exe"
set "LOGS=%~dp0logs"

if /i "%~1"=="status" goto status
if /i "%~1"=="stop" goto stop
if /i "%~1"=="test" goto test
if /i "%~1"=="setup" (call :ensure_venv && call :ensure_model & exit /b !errorlevel!)
goto start

:ensure_model
if "%BATOS_MODEL%"=="" set "BATOS_MODEL=auto"
if /i "%BATOS_MODEL%"=="none" exit /b 0
"%PY%" batos.py models fetch %BATOS_MODEL% || (echo puter: the code model could not be installed; BATOS_MODEL=none skips it & exit /b 1)
exit /b 0

:ensure_venv
if not exist "%PY%" (
    echo puter: creating the virtualenv in %BATOS_VENV%
    %PYTHON% -m venv "%BATOS_VENV%" || (echo puter: Python 3.11 is required & exit /b 1)
)
if not exist "%BATOS_VENV%\.batos-installed" (
    echo puter: installing BAT OS and its dependencies ^(first run: several minutes^)
    "%PY%" -m pip install --quiet --upgrade pip
    "%PY%" -m pip install -e ".[%BATOS_EXTRAS%]" || exit /b 1
    echo installed> "%BATOS_VENV%\.batos-installed"
)
exit /b 0

:status
call :ensure_venv || exit /b 1
"%PY%" chat_client.py --ping --endpoint %BATOS_ENDPOINT% --timeout 2
if errorlevel 1 (echo puter: no kernel answers at %BATOS_ENDPOINT% & exit /b 3)
if exist "%LOGS%\watchdog.status.json" type "%LOGS%\watchdog.status.json"
exit /b 0

:stop
if not exist "%LOGS%\watchdog.pid" (echo puter: not running & exit /b 0)
set /p WPID=<"%LOGS%\watchdog.pid"
rem Windows has no SIGTERM: CTRL_BREAK reaches the watchdog's process group.
"%PY%" -c "import os,signal,sys; os.kill(int(sys.argv[1]), signal.CTRL_BREAK_EVENT)" %WPID%
del "%LOGS%\watchdog.pid"
echo puter: stop requested
exit /b 0

:test
call :ensure_venv || exit /b 1
call :ensure_model || exit /b 1
set HF_HUB_OFFLINE=1
set TRANSFORMERS_OFFLINE=1
shift
"%PY%" -m ruff check . || exit /b 1
"%PY%" -m pytest %1 %2 %3 %4 %5 %6 %7 %8 %9
exit /b %errorlevel%

:start
set "DETACH=0"
set "DEMO="
set "CLIENT="
:parse
if "%~1"=="" goto parsed
if /i "%~1"=="--detach" set "DETACH=1"
if /i "%~1"=="--demo" (set "DEMO=--demo" & set "CLIENT=--no-model")
shift
goto parse
:parsed
call :ensure_venv || exit /b 1
if "%DEMO%"=="" (call :ensure_model || exit /b 1)
if not exist "%LOGS%" mkdir "%LOGS%"
echo puter: starting the watchdog and the kernel (logs in %LOGS%)
"%PY%" -c "import subprocess,sys; p=subprocess.Popen([sys.executable,'min_watchdog_service.py','--python',sys.executable,'--log-dir',r'%LOGS%','--','--endpoint','%BATOS_ENDPOINT%']+sys.argv[1:],creationflags=subprocess.CREATE_NEW_PROCESS_GROUP,stdout=open(r'%LOGS%\watchdog.out','ab'),stderr=subprocess.STDOUT); open(r'%LOGS%\watchdog.pid','w').write(str(p.pid))" %DEMO%
echo puter: waiting for the kernel
for /l %%i in (1,1,180) do (
    "%PY%" chat_client.py --ping --endpoint %BATOS_ENDPOINT% --timeout 2 >nul 2>&1 && goto up
    timeout /t 1 /nobreak >nul
)
echo puter: the kernel did not answer within 3 minutes; see %LOGS%\kernel.log
exit /b 1
:up
"%PY%" chat_client.py --endpoint %BATOS_ENDPOINT% %CLIENT%
if "%DETACH%"=="1" (echo puter: the kernel keeps running; puter.bat stop ends it & exit /b 0)
set /p ANSWER=Stop the kernel? [Y/n] 
if /i "%ANSWER%"=="n" (echo puter: the kernel keeps running & exit /b 0)
goto stop
