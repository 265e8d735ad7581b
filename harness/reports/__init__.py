"""Reports: the scenario matrix, the report model (build, merge, diff), rendering, the report CLI."""
