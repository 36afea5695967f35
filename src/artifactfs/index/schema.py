"""The index schema, written as its specification.

One SQLite database per store (`<store>/index.sqlite3`, WAL mode). `PRAGMA user_version` holds
the schema version; `migrations.py` moves a database forward one version at a time. Every table
below is described column by column; the invariants at the end are what `fsck` checks.

Node kinds (`inodes.kind`):
  0 ROOT       the grid root (inode 1, the FUSE root)
  1 SANDBOX    a sandbox directory (child of the root)
  2 SCOPE      a scope directory (`shared`, `user-<id>`, `sess-<id>`) inside a sandbox
  3 NSROOT     the root directory of a workspace namespace (child of a scope)
  4 DIR        a directory inside a workspace
  5 FILE       a regular file (inside a workspace, or a blob namespace itself)
  6 SYMLINK    a symbolic link inside a workspace
  7 SPECIAL    a FIFO, socket or device node inside a workspace
"""

from __future__ import annotations

SCHEMA_VERSION = 5

# Version 1, as created by the first migration. Later versions change it only through
# migrations; this text stays the record of version 1.
SCHEMA_V1 = """
-- Store-wide settings written once by `init` (store_id, block_size, created_ns).
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Every node of the tree, grid levels included. `id` is the FUSE inode number; AUTOINCREMENT
-- so that a number is never reused (the kernel may still hold an old one).
CREATE TABLE inodes (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    kind         INTEGER NOT NULL,          -- node kind, see the module docstring
    mode         INTEGER NOT NULL,          -- st_mode, type bits included
    uid          INTEGER NOT NULL,
    gid          INTEGER NOT NULL,
    nlink        INTEGER NOT NULL,          -- names pointing here (+1 per subdir, +2 for a dir)
    size         INTEGER NOT NULL DEFAULT 0,  -- bytes (files), target length (symlinks)
    rdev         INTEGER NOT NULL DEFAULT 0,
    atime_ns     INTEGER NOT NULL,
    mtime_ns     INTEGER NOT NULL,
    ctime_ns     INTEGER NOT NULL,
    btime_ns     INTEGER NOT NULL,          -- creation time
    namespace_id INTEGER,                   -- namespaces.id; NULL for root, sandboxes, scopes
    sha256       BLOB,                      -- whole-content SHA-256 of a file; NULL = unknown
    stored       INTEGER NOT NULL DEFAULT 0  -- bytes of storage its blocks use (st_blocks)
);

-- Names. A directory's children; a file with n hard links has n rows. `id` orders readdir
-- and is its resume offset.
CREATE TABLE dentries (
    id     INTEGER PRIMARY KEY,
    parent INTEGER NOT NULL REFERENCES inodes(id),
    name   BLOB NOT NULL,
    inode  INTEGER NOT NULL REFERENCES inodes(id),
    UNIQUE (parent, name)
);
CREATE INDEX dentries_by_inode ON dentries(inode);

-- Sandboxes (children of the grid root).
CREATE TABLE sandboxes (
    id         INTEGER PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    inode      INTEGER NOT NULL UNIQUE REFERENCES inodes(id),
    created_ns INTEGER NOT NULL
);

-- Scopes of a sandbox. kind 'shared' (owner ''), 'user' (owner = user id), 'session'
-- (owner = session id; expires_ns set when a credential gives it a lifetime).
CREATE TABLE scopes (
    id         INTEGER PRIMARY KEY,
    sandbox_id INTEGER NOT NULL REFERENCES sandboxes(id),
    kind       TEXT NOT NULL CHECK (kind IN ('shared', 'user', 'session')),
    owner      TEXT NOT NULL,
    name       TEXT NOT NULL,               -- the directory name: shared, user-<id>, sess-<id>
    inode      INTEGER NOT NULL UNIQUE REFERENCES inodes(id),
    created_ns INTEGER NOT NULL,
    expires_ns INTEGER,
    UNIQUE (sandbox_id, name)
);

-- Namespaces: a workspace (a directory tree under root_inode) or a blob (root_inode is one
-- regular file). `public_id` is the stable id users see (xattr user.artifactfs.namespace).
CREATE TABLE namespaces (
    id         INTEGER PRIMARY KEY,
    public_id  TEXT NOT NULL UNIQUE,
    scope_id   INTEGER NOT NULL REFERENCES scopes(id),
    kind       TEXT NOT NULL CHECK (kind IN ('workspace', 'blob')),
    owner      TEXT NOT NULL,               -- uid of the creator, or the credential's user
    name       TEXT NOT NULL,
    root_inode INTEGER NOT NULL UNIQUE REFERENCES inodes(id),
    created_ns INTEGER NOT NULL,
    UNIQUE (scope_id, name)
);

-- Block map of a file: block `idx` covers bytes [idx*block_size, (idx+1)*block_size).
-- A missing row is a hole (reads as zeros, stores nothing). `digest` is the SHA-256 of the
-- block's stored bytes, which may be shorter than block_size at the end of the file.
CREATE TABLE blocks (
    inode  INTEGER NOT NULL REFERENCES inodes(id),
    idx    INTEGER NOT NULL,
    digest BLOB NOT NULL,
    PRIMARY KEY (inode, idx)
) WITHOUT ROWID;
CREATE INDEX blocks_by_digest ON blocks(digest);

-- Blobs the index knows to be stored in the backend (written before the row that uses them
-- commits). Blobs present in the backend but absent here were written and never committed
-- (a crash between put and commit): gc reclaims them after a grace period.
CREATE TABLE blobs (
    digest     BLOB PRIMARY KEY,
    size       INTEGER NOT NULL,
    created_ns INTEGER NOT NULL
) WITHOUT ROWID;

-- Small blocks committed to a block map before their put into the backend finished (the
-- write-back journal): the daemon's mover stores them and deletes the row; a daemon that
-- starts after a crash stores what is left here first. Readers find these bytes here until
-- then, so a block map may name a digest that is in `pending_blobs` instead of the backend.
CREATE TABLE pending_blobs (
    digest     BLOB PRIMARY KEY,
    data       BLOB NOT NULL
) WITHOUT ROWID;

CREATE TABLE symlinks (
    inode  INTEGER PRIMARY KEY REFERENCES inodes(id),
    target BLOB NOT NULL
);

-- Extended attributes set by users (the read-only user.artifactfs.* ones are computed).
CREATE TABLE xattrs (
    inode INTEGER NOT NULL REFERENCES inodes(id),
    name  BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (inode, name)
) WITHOUT ROWID;

-- Append-only audit log. `payload` is a CBOR map; rows are never updated or deleted.
CREATE TABLE events (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    time_ns INTEGER NOT NULL,
    type    TEXT NOT NULL,                  -- e.g. namespace.create, mount.start
    sandbox TEXT,                           -- for filtering; NULL for store-wide events
    payload BLOB NOT NULL
);
CREATE INDEX events_by_type ON events(type, seq);
"""

# Version 2: checkpoints, structural sharing, the change feed and live mounts.
SCHEMA_V2 = """
-- Checkpoints of a namespace: the digest of the root manifest plus a small record. Manifests
-- are CBOR blobs in the blob store (core/manifest.py describes them); `files` and `bytes`
-- count regular-file names and their logical bytes; `manifest_bytes` is what this checkpoint
-- wrote (manifests it shared with earlier ones are not counted).
CREATE TABLE checkpoints (
    id             INTEGER PRIMARY KEY,
    namespace_id   INTEGER NOT NULL REFERENCES namespaces(id),
    name           TEXT NOT NULL,
    root           BLOB NOT NULL,
    created_ns     INTEGER NOT NULL,
    creator        TEXT NOT NULL,
    files          INTEGER NOT NULL,
    bytes          INTEGER NOT NULL,
    manifest_bytes INTEGER NOT NULL,
    UNIQUE (namespace_id, name)
);

-- Structural sharing. A workspace directory (kind 3 or 4) is *clean* when it has a row here
-- and none in dirty_dirs: its manifest as of the last checkpoint is `digest`, and nothing
-- below it changed since. `files`/`bytes` aggregate its subtree. Rows of dirty directories
-- are stale and ignored.
CREATE TABLE dir_manifests (
    inode  INTEGER PRIMARY KEY,
    digest BLOB NOT NULL,
    files  INTEGER NOT NULL,
    bytes  INTEGER NOT NULL
);

-- Directories changed since their manifest was last recorded. `seq` grows with every change
-- to the directory itself (a checkpoint built from a snapshot keeps a directory dirty when
-- its seq moved past the snapshot's). Invariant: a directory that is not clean has no clean
-- ancestor, so a checkpoint finds every change by walking down from the root through dirty
-- directories only. The triggers below keep it, whoever writes (daemon, CLI, migration).
CREATE TABLE dirty_dirs (
    seq   INTEGER PRIMARY KEY AUTOINCREMENT,
    inode INTEGER NOT NULL UNIQUE
);

-- INSERT INTO mark_dirty VALUES (ino) marks what a change to `ino` touches: ino itself when
-- it is a workspace directory, else every directory holding a name of it (those get a fresh
-- seq), then their ancestors up to the first one that already was not clean. The walk only
-- tests the directory it is about to add, so it is right however SQLite orders the inserts.
CREATE VIEW mark_dirty(inode) AS SELECT NULL WHERE 0;
CREATE TRIGGER mark_dirty_do INSTEAD OF INSERT ON mark_dirty BEGIN
    INSERT OR REPLACE INTO dirty_dirs (inode)
        SELECT id FROM inodes WHERE id = NEW.inode AND kind IN (3, 4)
        UNION
        SELECT d.parent FROM dentries d JOIN inodes p ON p.id = d.parent
        WHERE d.inode = NEW.inode AND p.kind IN (3, 4)
          AND NOT EXISTS (SELECT 1 FROM inodes WHERE id = NEW.inode AND kind IN (3, 4));
    INSERT OR IGNORE INTO dirty_dirs (inode)
        WITH RECURSIVE up(i) AS (
            SELECT id FROM inodes WHERE id = NEW.inode AND kind IN (3, 4)
            UNION
            SELECT d.parent FROM dentries d JOIN inodes p ON p.id = d.parent
            WHERE d.inode = NEW.inode AND p.kind IN (3, 4)
              AND NOT EXISTS (SELECT 1 FROM inodes WHERE id = NEW.inode AND kind IN (3, 4))
            UNION
            SELECT d.parent FROM up JOIN dentries d ON d.inode = up.i
                JOIN inodes p ON p.id = d.parent
            WHERE p.kind IN (3, 4)
              AND EXISTS (SELECT 1 FROM dir_manifests m WHERE m.inode = d.parent)
              AND NOT EXISTS (SELECT 1 FROM dirty_dirs x WHERE x.inode = d.parent)
        )
        SELECT i FROM up;
END;

-- The triggers below call mark_dirty only when it can matter: while a checkpoint is being
-- built (a row in `building`; every change must then move a seq past the snapshot), or when
-- a directory the change touches is not yet in dirty_dirs. A directory already there has no
-- clean ancestor, so the common case costs one probe instead of a walk.
CREATE TABLE building (
    id         INTEGER PRIMARY KEY,
    pid        INTEGER NOT NULL,
    started_ns INTEGER NOT NULL
);

CREATE TRIGGER dirty_on_inode AFTER UPDATE ON inodes
WHEN NEW.namespace_id IS NOT NULL AND (
    OLD.mode IS NOT NEW.mode OR OLD.uid IS NOT NEW.uid OR OLD.gid IS NOT NEW.gid
    OR OLD.nlink IS NOT NEW.nlink OR OLD.size IS NOT NEW.size OR OLD.rdev IS NOT NEW.rdev
    OR OLD.atime_ns IS NOT NEW.atime_ns OR OLD.mtime_ns IS NOT NEW.mtime_ns
    OR OLD.ctime_ns IS NOT NEW.ctime_ns OR OLD.btime_ns IS NOT NEW.btime_ns
    -- NULL -> digest only records what the content already was: no change.
    OR (OLD.sha256 IS NOT NEW.sha256 AND OLD.sha256 IS NOT NULL))
AND (EXISTS (SELECT 1 FROM building)
    OR (NEW.kind IN (3, 4) AND NOT EXISTS (SELECT 1 FROM dirty_dirs WHERE inode = NEW.id))
    OR (NEW.kind NOT IN (3, 4) AND EXISTS (SELECT 1 FROM dentries d WHERE d.inode = NEW.id
        AND NOT EXISTS (SELECT 1 FROM dirty_dirs x WHERE x.inode = d.parent))))
BEGIN
    INSERT INTO mark_dirty VALUES (NEW.id);
END;
CREATE TRIGGER dirty_on_dentry_insert AFTER INSERT ON dentries
WHEN EXISTS (SELECT 1 FROM building)
    OR NOT EXISTS (SELECT 1 FROM dirty_dirs WHERE inode = NEW.parent)
BEGIN
    INSERT INTO mark_dirty VALUES (NEW.parent);
END;
CREATE TRIGGER dirty_on_dentry_delete AFTER DELETE ON dentries
WHEN EXISTS (SELECT 1 FROM building)
    OR NOT EXISTS (SELECT 1 FROM dirty_dirs WHERE inode = OLD.parent)
BEGIN
    INSERT INTO mark_dirty VALUES (OLD.parent);
END;
CREATE TRIGGER dirty_on_dentry_update AFTER UPDATE ON dentries BEGIN
    INSERT INTO mark_dirty VALUES (OLD.parent);
    INSERT INTO mark_dirty VALUES (NEW.parent);
END;
CREATE TRIGGER dirty_on_xattr_insert AFTER INSERT ON xattrs BEGIN
    INSERT INTO mark_dirty VALUES (NEW.inode);
END;
CREATE TRIGGER dirty_on_xattr_update AFTER UPDATE ON xattrs BEGIN
    INSERT INTO mark_dirty VALUES (NEW.inode);
END;
CREATE TRIGGER dirty_on_xattr_delete AFTER DELETE ON xattrs BEGIN
    INSERT INTO mark_dirty VALUES (OLD.inode);
END;
CREATE TRIGGER forget_dir_state AFTER DELETE ON inodes WHEN OLD.kind IN (3, 4) BEGIN
    DELETE FROM dirty_dirs WHERE inode = OLD.id;
    DELETE FROM dir_manifests WHERE inode = OLD.id;
END;

-- Files whose whole-content SHA-256 is not known yet: a checkpoint computes them first.
CREATE INDEX inodes_unhashed ON inodes(namespace_id) WHERE sha256 IS NULL AND kind = 5;

-- The change feed: what a process changed behind the back of other mounts of this store
-- (a restore by the CLI, for now), so each daemon can drop the kernel's cached entries
-- (kind 0: name `name` in directory `ino`) and attributes/pages (kind 1: inode `ino`).
-- Rows are transient: writers prune those older than a few minutes.
CREATE TABLE changes (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    time_ns INTEGER NOT NULL,
    kind    INTEGER NOT NULL,
    ino     INTEGER NOT NULL,
    name    BLOB
);

-- Running daemons of this store. `seen_seq` is the last change-feed row the daemon applied,
-- so a writer can wait until every mount shows its change.
CREATE TABLE mounts (
    id         INTEGER PRIMARY KEY,
    pid        INTEGER NOT NULL,
    mountpoint TEXT NOT NULL,
    started_ns INTEGER NOT NULL,
    seen_seq   INTEGER NOT NULL
);
"""

# Version 3: credentials, and the upload state of blobs for remote (S3) stores.
SCHEMA_V3 = """
-- Credentials issued for this store. The signed token is never stored (nor logged): only
-- what it grants and whether it was revoked. `id` is the token's jti.
CREATE TABLE credentials (
    id         TEXT PRIMARY KEY,
    sandbox    TEXT NOT NULL,
    user       TEXT NOT NULL,
    session    TEXT NOT NULL,
    grants     BLOB NOT NULL,               -- CBOR map, e.g. {"shared": "ro", "user": "rw"}
    issued_ns  INTEGER NOT NULL,
    expires_ns INTEGER NOT NULL,
    revoked_ns INTEGER,
    issuer     TEXT NOT NULL
);

-- A mount made with a credential records its id (NULL: the administrative view).
ALTER TABLE mounts ADD COLUMN credential TEXT;

-- Remote stores: 0 while a blob is only in the local cache (the persistent upload queue),
-- 1 once it is safely in the bucket. Local stores write 1 (nothing to upload).
ALTER TABLE blobs ADD COLUMN uploaded INTEGER NOT NULL DEFAULT 1;
CREATE INDEX blobs_to_upload ON blobs(created_ns) WHERE uploaded = 0;
"""

# Version 4: many mounts of one store.
SCHEMA_V4 = """
-- Which mount (mounts.id) wrote a change-feed row; NULL for other processes (the CLI).
-- While several mounts serve one store, each daemon's connection publishes its own changes
-- through TEMP triggers (Index.publish_changes) and skips its own rows when following the
-- feed (fuse/changes.py).
ALTER TABLE changes ADD COLUMN origin INTEGER;
CREATE INDEX changes_by_time ON changes(time_ns);
"""

# Version 5: the journal of small blocks leaves the index.
SCHEMA_V5 = """
-- Small blocks committed before the mover stored them are kept in journal files of their own
-- (blobs/journal.py): their INSERT and later DELETE here cost a small file ~30 us and ~3 WAL
-- frames at its close, on the trio thread. Rows a version-4 daemon left are written to a
-- journal segment first (migrations._to_v5), which the next daemon to start stores.
DROP TABLE pending_blobs;
"""

# Invariants (checked by tests after every core operation, and later by fsck):
#  - inode 1 exists, kind ROOT; every other live inode (nlink > 0) has >= 1 dentry;
#  - a FILE/SYMLINK/SPECIAL inode's nlink equals its number of dentries;
#  - a directory's nlink is 2 + its number of child directories (ROOT, SANDBOX, SCOPE, NSROOT,
#    DIR all count as directories);
#  - inodes with nlink = 0 are open-unlinked files; they are deleted at the daemon's last
#    forget/release, or at the next start after a crash;
#  - every blocks.digest is in blobs, and every blob in `blobs` is in the backend or in
#    the journal of small blocks (blobs/journal.py; `pending_blobs` until version 5);
#  - (v2) a workspace directory that is not clean has no clean ancestor (see dirty_dirs).
