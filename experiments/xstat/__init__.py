"""The x-stationary Gluon kernel for sm_90, measured slower than the tiled kernel (experiments/xstat/README.md)."""
