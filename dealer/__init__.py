"""SecDFD dealer package."""
