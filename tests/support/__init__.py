"""Test helpers: certificates, provider configs, a raw SMTP dialog client."""
