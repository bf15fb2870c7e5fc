"""Measurement: comparisons, statistics, the gate, reports, plots. Pure: no processes, no pytest."""
