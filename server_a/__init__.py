"""SecDFD server_a package."""
