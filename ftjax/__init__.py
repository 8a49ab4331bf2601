"""ftjax."""
