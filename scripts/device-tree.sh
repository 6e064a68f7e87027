#!/usr/bin/env bash
# Makes the working tree small enough to travel to a lent GPU machine (the `device` tool sends
# tracked and untracked-not-ignored files, at most 64 MiB with the carried paths; this tree's
# fixtures alone are larger), and puts it back.
#
#   scripts/device-tree.sh slim       # untrack the big folders in the index only, ignore them
#   ... device run with carry ["target/gpu"], command: scripts/gpu-check.sh target/gpu "$OUT"
#   scripts/device-tree.sh restore    # index back to HEAD, ignore lines removed
#
# Files on disk are never touched: `slim` removes the folders from the index (git rm --cached)
# and lists them in .git/info/exclude; `restore` resets the index to HEAD. `slim` refuses to run
# with staged changes (they would be lost by `restore`), and `status` says which state it is in.
# Always `restore` before committing: a commit made while slim would delete the fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
BIG=(tests/fixtures models training)
MARK="# device-tree.sh slim"
EXCLUDE=.git/info/exclude

case "${1:-status}" in
  slim)
    if grep -qF "$MARK" "$EXCLUDE" 2>/dev/null; then echo "already slim"; exit 0; fi
    if ! git diff --cached --quiet; then echo "staged changes present: commit or unstage them first" >&2; exit 1; fi
    for d in "${BIG[@]}"; do
      [[ -e "$d" ]] && git rm -r -q --cached --ignore-unmatch "$d"
    done
    { echo "$MARK"; for d in "${BIG[@]}"; do echo "/$d/"; done; echo "$MARK end"; } >>"$EXCLUDE"
    echo "slim: $(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) bytes tracked; run scripts/device-tree.sh restore afterwards"
    ;;
  restore)
    git reset -q
    if [[ -f "$EXCLUDE" ]]; then
      sed -i "/^$MARK\$/,/^$MARK end\$/d" "$EXCLUDE"
    fi
    echo "restored: $(git ls-files | wc -l) files tracked"
    ;;
  status)
    if grep -qF "$MARK" "$EXCLUDE" 2>/dev/null; then echo "slim (run: scripts/device-tree.sh restore)"; else echo "normal"; fi
    ;;
  *)
    echo "usage: scripts/device-tree.sh slim|restore|status" >&2
    exit 2
    ;;
esac
