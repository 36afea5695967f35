"""artifactfs: a content-addressed artifact store presented as a mountable FUSE grid."""

__version__ = "0.1.0"
