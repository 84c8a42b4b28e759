"""The large-scale evaluation protocols' names and block size, apart from their engine
(pipelines/large_scale.py, which imports torch) so the CLI lists them without importing it."""

# MegaFace Challenge 1, Trillion-Pairs, MFR-ALL-style all-to-all, YouTube Faces.
PROTOCOLS = ("megaface", "trillion-pairs", "mfr-all", "ytf")
# Rows per block: a task scores two blocks (memory per task ~ 2 blocks + one tile of scores).
DEFAULT_BLOCK = 32768
