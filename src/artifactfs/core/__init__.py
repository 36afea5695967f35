"""The filesystem core: the grid, namespaces, inodes and file data, with plain Python types.

Nothing here imports pyfuse3; the FUSE adapter translates to and from these types.
"""
