#!/usr/bin/env bash
# The test command: starts the services the suite needs (real Redis and Postgres, installed from Debian if
# missing), then runs vitest. Arguments go to vitest, e.g. `npm test -- test/cli.test.ts`.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash .ci/services.sh)"
exec npx vitest run "$@"
