"""`mount.artifactfs`: the helper mount(8) runs for filesystems of type `artifactfs`.

Link it where mount(8) looks for helpers, then mount from /etc/fstab:

    ln -s "$(command -v mount.artifactfs)" /sbin/mount.artifactfs
    # /etc/fstab
    /var/lib/artifactfs/store  /srv/grid  artifactfs  defaults,allow_other  0  0
    mount /srv/grid

mount(8) calls `mount.artifactfs STORE MOUNTPOINT [-sfnv] [-o OPTIONS]`. Options that are
mount(8)'s own (rw, defaults, auto, noauto, user, nofail, _netdev, x-*) are dropped;
`credential=FILE` and `owner=UID:GID` become `artifactfs mount` options; the rest are FUSE
options (allow_other, ...). The daemon starts in the background and the helper returns once
the mount answers, as mount(8) expects. Unmount with `umount /srv/grid`.
"""

from __future__ import annotations

import argparse
import sys

from artifactfs.cli.main import main as artifactfs_main

IGNORED = {"rw", "defaults", "auto", "noauto", "user", "users", "nouser", "nofail", "_netdev",
           "dev", "suid", "exec", "async"}


def translate(argv: list[str]) -> list[str]:
    """`mount.artifactfs` arguments -> `artifactfs mount` arguments."""
    p = argparse.ArgumentParser(prog="mount.artifactfs", add_help=True)
    p.add_argument("store")
    p.add_argument("mountpoint")
    p.add_argument("-o", dest="options", action="append", default=[])
    for flag in ("-s", "-f", "-n", "-v"):  # sloppy, fake, no-mtab, verbose: accepted
        p.add_argument(flag, action="store_true")
    args = p.parse_args(argv)
    out = ["mount", args.store, args.mountpoint]
    fuse: list[str] = []
    for group in args.options:
        for opt in group.split(","):
            if not opt or opt in IGNORED or opt.startswith("x-"):
                continue
            key, _, value = opt.partition("=")
            if key == "credential":
                out += ["--credential", value]
            elif key == "owner":
                out += ["--owner", value]
            else:
                fuse.append(opt)
    if fuse:
        out += ["-o", ",".join(fuse)]
    return out


def main() -> None:
    sys.argv = ["artifactfs", *translate(sys.argv[1:])]
    artifactfs_main()


if __name__ == "__main__":
    main()
