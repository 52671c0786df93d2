# File helpers of the local environment's scripts: one copy, sourced.
# shellcheck shell=bash
set -o pipefail

# replace_if_changed TMP DEST: moves TMP over DEST when they differ (true: it did), else
# removes TMP (false), so a re-run leaves DEST and its mtime alone.
replace_if_changed() {
  if cmp -s "$1" "$2"; then rm -f "$1"; return 1; fi
  mv "$1" "$2"
}
