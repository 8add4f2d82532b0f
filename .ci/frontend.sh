#!/usr/bin/env bash
# CI: the frontend from its lock file (`npm ci`), its unit tests (`npm test`: vitest), then
# type-checked against the published @openai/chatkit types and built (`npm run build` ->
# frontend/dist/, which the browser tests serve through nginx). Needs Node.js ^20.19 or
# >= 22.12 with its npm.
set -euo pipefail
cd "$(dirname "$0")/../frontend"
if ! command -v npm >/dev/null 2>&1; then
  echo "frontend: npm is not installed (Node.js ^20.19 or >= 22.12 is needed)" >&2
  exit 1
fi
node -e '
  const [major, minor] = process.versions.node.split(".").map(Number);
  if (!((major === 20 && minor >= 19) || major >= 22)) {
    console.error(`frontend: Node.js ${process.versions.node} is too old for Vite (^20.19 or >= 22.12)`);
    process.exit(1);
  }'
npm ci --no-audit --no-fund
npm test
npm run build
