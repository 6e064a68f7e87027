#!/usr/bin/env bash
# `cargo deny check advisories` on Cargo.lock, against the snapshot of the RustSec advisory
# database committed as deny/advisory-db.tar.xz (CI's network reaches crates.io and PyPI, not
# GitHub, where the database lives). Any vulnerability, unsound or unmaintained advisory for a
# crate in the lock file fails, except those deny.toml ignores with a reason.
#
#   scripts/advisories.sh             check against the committed snapshot
#   scripts/advisories.sh --refresh   first replace the snapshot with the database's newest
#                                     commit (needs GitHub; commit the new tarball)
#
# cargo-deny is target/tools/bin/cargo-deny (as .ci/run installs it) or $CARGO_DENY.
set -euo pipefail
cd "$(dirname "$0")/.."
deny="${CARGO_DENY:-target/tools/bin/cargo-deny}"
snapshot=deny/advisory-db.tar.xz
root=target/advisory-db
# The directory cargo-deny derives from deny.toml's db-urls (its name and XxHash64 of the URL).
db="$root/advisory-db-3157b0e258782691"

if [ "${1:-}" = --refresh ]; then
    fresh="$(mktemp -d)"
    trap 'rm -rf "$fresh"' EXIT
    git clone --quiet --depth 1 https://github.com/rustsec/advisory-db "$fresh/db"
    {
        echo "commit = \"$(git -C "$fresh/db" log -1 --format=%H)\""
        echo "date = \"$(git -C "$fresh/db" log -1 --format=%cI)\""
        echo 'source = "https://github.com/rustsec/advisory-db"'
    } > "$fresh/db/SNAPSHOT.toml"
    tar -C "$fresh/db" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
        -cJf "$snapshot" SNAPSHOT.toml LICENSE.txt LICENSES crates
    echo "refreshed $snapshot: $(tr '\n' ' ' < "$fresh/db/SNAPSHOT.toml")"
fi

# cargo-deny reads the database from a git checkout: unpack the snapshot into one whose commit
# (and HEAD, which cargo-deny takes as the fetch time) carry the snapshot's own date, so the
# database's age is stated, never disguised as a fresh fetch.
rm -rf "$root"
mkdir -p "$db"
tar -C "$db" -xJf "$snapshot"
date="$(sed -n 's/^date = "\(.*\)"$/\1/p' "$db/SNAPSHOT.toml")"
commit="$(sed -n 's/^commit = "\(.*\)"$/\1/p' "$db/SNAPSHOT.toml")"
git -C "$db" init --quiet
git -C "$db" add --all
GIT_AUTHOR_DATE="$date" GIT_COMMITTER_DATE="$date" \
    git -C "$db" -c user.name=rustsec -c user.email=rustsec@invalid -c commit.gpgsign=false \
    commit --quiet -m "RustSec advisory database $commit"
touch -d "$date" "$db/.git/HEAD"
echo "RustSec advisory database of $date (commit $commit, $(find "$db/crates" -name '*.md' | wc -l) advisories)"
"$deny" --offline check advisories
