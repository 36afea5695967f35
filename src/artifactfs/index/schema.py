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

SCHEMA_VERSION = 1

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

# Invariants (checked by tests after every core operation, and later by fsck):
#  - inode 1 exists, kind ROOT; every other live inode (nlink > 0) has >= 1 dentry;
#  - a FILE/SYMLINK/SPECIAL inode's nlink equals its number of dentries;
#  - a directory's nlink is 2 + its number of child directories (ROOT, SANDBOX, SCOPE, NSROOT,
#    DIR all count as directories);
#  - inodes with nlink = 0 are open-unlinked files; they are deleted at the daemon's last
#    forget/release, or at the next start after a crash;
#  - every blocks.digest is in blobs, and every blob in `blobs` is in the backend or in
#    pending_blobs.
