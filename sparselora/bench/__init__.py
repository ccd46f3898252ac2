"""Benchmarks that ship with the package (`sparselora bench --trainer`): model shapes with random weights, the
real data sets' token lengths (lengths/*.json), and the Trainer-level training benchmark."""
