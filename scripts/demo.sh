#!/usr/bin/env bash
# Installs everything, then shows artifactfs: a store, the grid mounted at ~/grid, a sandbox
# with a few workspaces and a blob, and how to unmount. Idempotent: a second run remounts.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
AFS=$PWD/.venv/bin/artifactfs
STORE=${ARTIFACTFS_STORE:-$HOME/.local/share/artifactfs/store}
GRID=${ARTIFACTFS_GRID:-$HOME/grid}

if grep -q " $GRID fuse" /proc/mounts; then
    "$AFS" umount "$GRID" || fusermount3 -u -z "$GRID"
fi
"$AFS" init "$STORE"
mkdir -p "$GRID"
"$AFS" mount "$STORE" "$GRID"

# A sandbox with the three kinds of scope, two workspaces and a blob.
mkdir -p "$GRID/demo/shared" "$GRID/demo/user-alice" "$GRID/demo/sess-0001"
mkdir -p "$GRID/demo/user-alice/notes" "$GRID/demo/shared/build"
[ -d "$GRID/demo/user-alice/notes/.git" ] || {
    printf '# Notes\n\nWritten through artifactfs.\n' > "$GRID/demo/user-alice/notes/README.md"
    git -C "$GRID/demo/user-alice/notes" init -q
    git -C "$GRID/demo/user-alice/notes" add README.md
    git -C "$GRID/demo/user-alice/notes" -c user.name=demo -c user.email=demo@example.com \
        commit -qm "first note"
}
tar -C src -cf - artifactfs | tar -C "$GRID/demo/shared/build" -xf -
echo "artifactfs demo blob $(date -u +%FT%TZ)" > "$GRID/demo/sess-0001/report.txt"
setfattr -n user.mime_type -v text/plain "$GRID/demo/sess-0001/report.txt"

echo
echo "== the grid at $GRID"
ls -l "$GRID" "$GRID/demo" "$GRID/demo/"*/
echo
echo "== artifact metadata of the blob: what was set, then what artifactfs computes (read by name)"
getfattr --absolute-names -d -m - "$GRID/demo/sess-0001/report.txt"
for name in user.artifactfs.sha256 user.artifactfs.namespace; do
    getfattr --absolute-names --only-values -n "$name" "$GRID/demo/sess-0001/report.txt" | sed "s/^/$name=/"
    echo
done
echo
echo "== files in the build workspace: $(find "$GRID/demo/shared/build" -type f | wc -l), git log of notes:"
git -C "$GRID/demo/user-alice/notes" log --oneline
echo
df -h "$GRID"
echo
echo "The grid stays mounted. Unmount it with:  $AFS umount $GRID"
