#!/usr/bin/env bash
# Print the path of a Python 3.12 interpreter that actually runs.
# Order: $PYTHON (user override), python3.12 on PATH, pyenv's 3.12 (PYENV_VERSION), pyenv's folder.
set -u
works() { "$@" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; }
if [ -n "${PYTHON:-}" ]; then
  works "$PYTHON" && { command -v "$PYTHON"; exit 0; }
  echo "PYTHON=$PYTHON is not a working Python 3.12" >&2; exit 1
fi
if works python3.12; then
  python3.12 -c 'import sys; print(sys.executable)'; exit 0
fi
for version in $(pyenv versions --bare 2>/dev/null | grep '^3\.12' | sort -rV); do
  if works env PYENV_VERSION="$version" python3.12; then
    PYENV_VERSION="$version" python3.12 -c 'import sys; print(sys.executable)'; exit 0
  fi
done
for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
  works "$candidate" && { echo "$candidate"; exit 0; }
done
echo "no working Python 3.12 found; megatron-core >= 0.17 needs it. Set PYTHON=/path/to/python3.12" >&2
exit 1
