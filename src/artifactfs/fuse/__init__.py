"""The FUSE adapter: a protocol adapter only (pyfuse3 types in, core calls, errnos out)."""
