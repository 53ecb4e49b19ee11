"""cli: the skimformer and optimize commands."""
