#!/usr/bin/env python3
"""Writes the layer that turns one root file system tarball into another: the entries of NEW that
BASE lacks or holds differently (type, mode, owner, link target or content; not the time stamp).

    rootfs-delta.py BASE.tar NEW.tar LAYER.tar

docker/images.sh bootstraps BASE and NEW with the same mmdebstrap options, NEW with some packages
more; the layer then holds what installing those packages added or changed (their files, the dpkg
database, /etc/passwd for a system user), and `FROM` the base image plus `ADD` of the layer is NEW.
A layer cannot delete, so an entry of BASE missing from NEW is an error. Standard library only."""

import hashlib
import sys
import tarfile


def digest(tar, member):
    if not member.isfile():
        return None
    h = hashlib.sha256()
    f = tar.extractfile(member)
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def identity(tar, member):
    return (member.type, member.mode, member.uid, member.gid, member.linkname,
            member.devmajor, member.devminor, digest(tar, member))


def main(base_path, new_path, layer_path):
    with tarfile.open(base_path) as base:
        have = {m.name: identity(base, m) for m in base.getmembers()}
    with tarfile.open(new_path) as new:
        members = new.getmembers()
        names = {m.name for m in members}
        gone = sorted(set(have) - names)
        if gone:
            sys.exit(f"rootfs-delta: {len(gone)} entries of the base are missing from {new_path}, "
                     f"which a layer cannot express: {gone[:10]}")
        keep = {m.name for m in members if have.get(m.name) != identity(new, m)}
        # A hard link is written as a link to an earlier entry of the same archive: keep its target.
        keep |= {m.linkname for m in members if m.name in keep and m.islnk()}
        size = 0
        with tarfile.open(layer_path, "w", format=tarfile.PAX_FORMAT) as layer:
            for m in members:
                if m.name in keep:
                    layer.addfile(m, new.extractfile(m) if m.isfile() else None)
                    size += m.size if m.isfile() else 0
    print(f"rootfs-delta: {len(keep)} of {len(members)} entries ({size / 1e6:.1f} MB) differ from the base")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
