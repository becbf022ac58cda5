"""Tests against a real single-host Slurm cluster started by the ``slurm`` fixture (see cluster.py)."""
