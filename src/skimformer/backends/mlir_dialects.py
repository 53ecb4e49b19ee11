"""The MLIR dialects the mlir backend writes, apart from the backend so that the command line
lists them without importing torch-mlir."""
MLIR_DIALECTS = ("torch", "linalg-on-tensors", "stablehlo")
DEFAULT_DIALECT = "linalg-on-tensors"
