#!/usr/bin/env bash
# The README's main command. The end-to-end federated demo (coordinator, owners, merge, table)
# arrives with issue #5; for now this installs, builds, and runs the operator CLI on a model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
build_dir=${FLEXFED_BUILD_DIR:-build}
"$build_dir/coordinator/flexfedctl" --help
