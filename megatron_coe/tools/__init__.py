"""Command-line tools around coe-train (soak runs, comparisons, analyses)."""
