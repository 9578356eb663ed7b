"""SecDFD common package."""
