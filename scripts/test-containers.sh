#!/usr/bin/env bash
# The container tests on their own (the README's test command runs them too): build the
# image, run its two roles against Tansu and a Chroma server, run docker-compose.yml with
# local stand-ins for the images no registry serves here. Ends with the image's size.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/test-env.sh
. scripts/test-env.sh
report=build/containers/report.json
rm -f "${report}"
status=0
python -m pytest -q -p no:cacheprovider -rs tests/containers "$@" || status=$?
python - "${report}" <<'PY'
import json, sys
from pathlib import Path

report = Path(sys.argv[1])
if not report.exists():
    print("image ings-daemon:local: not built in this run (see the skip or failure above)")
    sys.exit()
data = json.loads(report.read_text())
size = data["size_bytes"]["ings-daemon:local"]
built = data["build_seconds"].get("ings-daemon:local")
print(f"image ings-daemon:local: {size / 1e9:.2f} GB ({size:,} bytes), built in {built:.0f} s")
PY
exit "${status}"
