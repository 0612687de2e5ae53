"""The composition root: settings, the tally command, bringing up Kafka and ClickHouse."""
