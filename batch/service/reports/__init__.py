"""What the commands that only read report: `status`, `results`, and `estimate` with its cost model."""
