#!/usr/bin/env bash
# The test command: starts the services the suite needs (real Redis and Postgres, installed from Debian if
# missing), then runs vitest. Arguments go to vitest, e.g. `npm test -- test/cli.test.ts`.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash .ci/services.sh)"
summary=$(mktemp)
status=0
npx vitest run --reporter=default --reporter=json --outputFile.json="$summary" "$@" || status=$?
# One plain closing line that any log reader understands.
node -e '
  const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
  console.log(`Tests: ${r.numPassedTests} passed, ${r.numFailedTests} failed` + (r.numPendingTests ? `, ${r.numPendingTests} skipped` : ""));
' "$summary" 2>/dev/null || true
rm -f "$summary"
exit $status
