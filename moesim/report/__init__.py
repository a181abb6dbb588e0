"""Report layer: terminal tables and verdicts, result files, plots and the Perfetto timeline."""
