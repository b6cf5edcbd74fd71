"""quant: arrives with the low-precision issue."""
