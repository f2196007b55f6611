"""Code kept for reference outside the superblock package: nothing in superblock/ imports it (experiments/README.md)."""
