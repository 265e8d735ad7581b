"""Tools over the scenarios: benchmarks and soaks."""
