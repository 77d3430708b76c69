# Shared set-up for scripts/demo and scripts/test: install what is missing.
# Sourced, not run. Idempotent: a second run installs nothing.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV="$ROOT/.venv"
SYSTEM_PACKAGES=(fuse3 libfuse3-dev pkg-config python3-venv python3-dev gcc rsync git sqlite3 tar procps)

say() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }

ensure_system_packages() {
    command -v dpkg >/dev/null 2>&1 || return 0
    local missing=()
    for pkg in "${SYSTEM_PACKAGES[@]}"; do
        dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ]; then
        say "missing system packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})"
        return 1
    fi
    say "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
}

find_python() {
    local py
    for py in python3.13 python3.12 python3.11 python3; do
        if command -v "$py" >/dev/null 2>&1 &&
            "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$py"
            return 0
        fi
    done
    say "gridfs needs Python 3.11 or newer"
    return 1
}

ensure_venv() {
    local py stamp want
    py=$(find_python) || return 1
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating virtualenv $VENV"
        "$py" -m venv "$VENV"
    fi
    stamp="$VENV/.gridfs-installed"
    want=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] ||
        ! "$VENV/bin/python" -c 'import gridfs' 2>/dev/null; then
        say "installing gridfs and its test tools into $VENV"
        if ! { "$VENV/bin/python" -m pip install -q --upgrade pip &&
            "$VENV/bin/python" -m pip install -q -e "$ROOT[test]"; } >"$VENV/install.log" 2>&1; then
            cat "$VENV/install.log" >&2
            say "installing gridfs failed (log above)"
            return 1
        fi
        echo "$want" >"$stamp"
    fi
    # Byte-compile our own sources (an editable install does not), so each
    # gridfs command starts without compiling ~100 modules, even where
    # PYTHONDONTWRITEBYTECODE keeps Python from caching them itself.
    "$VENV/bin/python" -m compileall -q "$ROOT/gridfs" "$ROOT/daemon" >/dev/null 2>&1 || true
    export PATH="$VENV/bin:$PATH"
}
