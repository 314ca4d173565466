"""The runtime owns all I/O: Kafka in and out, the consumer loop and its commits, the
router (decode, retry, dead-letter), HTTP, metrics and logs. Roles are handler tables."""
