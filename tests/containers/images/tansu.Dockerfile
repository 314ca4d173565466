# Stands in for apache/kafka in the compose test: Tansu keeps its data in memory and has one
# listener, so the test override advertises kafka:29092, the name containers use.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY tansu /usr/local/bin/tansu
USER 65534:65534
ENTRYPOINT ["/usr/local/bin/tansu"]
CMD ["broker", "--listener-url", "tcp://0.0.0.0:29092", "--advertised-listener-url", "tcp://kafka:29092"]
