# tool_venv DIR EXECUTABLE PIP_ARGS...: a venv of its own at DIR (under the cache), made once
# (under a lock: two scripts may want it at once) by `pip install PIP_ARGS`, unless
# DIR/bin/EXECUTABLE is there already; a failed install leaves no DIR behind.
tool_venv() {
  local dir=$1 exe=$2; shift 2
  [ ! -x "$dir/bin/$exe" ] || return 0
  mkdir -p "$(dirname "$dir")"
  (
    flock 9
    if [ ! -x "$dir/bin/$exe" ]; then
      echo "[tool-venv] installing $exe into $dir" >&2
      rm -rf "$dir"
      python3 -m venv "$dir" && "$dir/bin/pip" install -q --disable-pip-version-check "$@" \
        || { rm -rf "$dir"; echo "[tool-venv] ERROR: could not install $exe" >&2; exit 1; }
    fi
  ) 9>"$(dirname "$dir")/.$(basename "$dir").lock"
}
