"""The device process (`fedge-edge`): config, ingest, the SQLite store and outbox, resource checks, the MQTT
round client, the service that ties them together, status and forget-me."""
