"""smtp subpackage; see the modules for their contracts."""
