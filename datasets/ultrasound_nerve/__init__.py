"""TFDS builder `ultrasound_nerve` (module ultrasound_nerve_dataset_builder).

Deliberately empty: importing the builder registers it with TFDS, and this package is
reachable both as `nerveseg_jax.datasets.ultrasound_nerve` (installed) and, for the
`tfds build datasets/ultrasound_nerve` CLI and pytest, as `datasets.ultrasound_nerve`.
Registering from here would register the same name twice in one process.
"""
