"""convert: arrives with the low-precision issue."""
