"""Fixtures shared by every test module: the real S3 server (tests/s3server.py)."""

from s3server import s3_bucket, s3_env, s3_prefix, s3_server

__all__ = ["s3_bucket", "s3_env", "s3_prefix", "s3_server"]
