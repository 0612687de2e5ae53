"""The Faust stream step: validate, enrich, pseudonymize, dead-letter."""
