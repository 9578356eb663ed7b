"""SecDFD client package."""
