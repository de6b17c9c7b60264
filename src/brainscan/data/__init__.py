"""Reading, ingesting, splitting and transforming image data."""
