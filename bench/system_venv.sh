#!/bin/sh
# A virtualenv of another Python build, with this checkout installed in it
# (editable, with the dev extras the benchmarks use), for
# FERMOPOSTA_BENCH_VENV=DIR (bench/README.md, "Which Python").  The default
# is /usr/bin/python3: the distribution's build, the one a Debian machine
# runs fermoposta on.  Debian's python3 has no ensurepip without its
# python3-venv package, so the venv is made without pip and the project
# venv's pip installs into it (either way).
# Usage: bench/system_venv.sh DIR [PYTHON]     (needs .venv: make test once)
set -eu
dir=${1:?usage: bench/system_venv.sh DIR [PYTHON]}
python=${2:-/usr/bin/python3}
root=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$root/.venv/bin/pip" ] || { echo "no $root/.venv: run 'make test' once first" >&2; exit 1; }
command -v "$python" >/dev/null || { echo "no Python at $python" >&2; exit 1; }
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "$python is older than Python 3.11" >&2; exit 1; }
"$python" -m venv --without-pip "$dir"
"$root/.venv/bin/pip" --python "$dir/bin/python" install -q -e "$root[dev]"
"$dir/bin/python" -c 'import sys; print("made", sys.argv[1], "with", sys.executable, sys.version.split()[0])' "$dir"
