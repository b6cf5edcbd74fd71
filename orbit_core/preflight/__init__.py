"""preflight: arrives with the low-precision issue."""
