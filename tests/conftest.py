# Shared pytest configuration. Fixtures live in plugin modules next to this file.
pytest_plugins = ["slurm_cluster"]  # the loopback Slurm test cluster (tests/slurm_cluster.py)
