"""Pure-torch math of the package. Nothing here imports Lightning."""
