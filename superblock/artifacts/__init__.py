"""The files superblock writes and reads back, at layer 1 so training, export and evaluation all build on them.

Modules (import the one that holds a name; this package imports nothing at load):
  checkpoint  training checkpoints: format tag, atomic save, weights-only load, the model a checkpoint holds
  format      the sparse export format: manifest, checksums, atomic directory writes
  folded      an export's folded dense model, read and verified
  spec        build_from_spec: the model a saved spec describes, before its saved weights are loaded
  resolve     what a path is (run, checkpoint, export, weights, transformers directory), without loading it
"""
