"""ClickHouse: backends, migrations, writer, sink loop, report queries."""
