#!/bin/sh
# azd preprovision hook (POSIX). Registers the resource providers the deployment needs but does not
# declare (Microsoft.App, for Flex Consumption). The logic lives in preprovision.py.
exec sh "$(dirname "$0")/run_hook.sh" preprovision.py
