"""What users read: the manifest and report data, text rendering for the terminal, the HTML report."""
