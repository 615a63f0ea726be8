"""Data: procedural visual relations, the VisRel TFDS builder and the grain input pipeline."""
