#!/bin/sh
# azd postprovision hook (POSIX). Creates the token key ring and the webhook secret in Key Vault
# if they do not exist yet; never overwrites them. The logic lives in postprovision.py.
exec sh "$(dirname "$0")/run_hook.sh" postprovision.py
