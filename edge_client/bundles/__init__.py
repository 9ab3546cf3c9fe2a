"""Signed model bundles on a device: the manifest and its signature, the on-disk store with rollback, and the
download over MQTT."""
