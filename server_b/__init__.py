"""SecDFD server_b package."""
