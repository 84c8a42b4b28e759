"""Model math for ArcFace, with no I/O: margins, backbones, the sharded classifier, metrics."""
