# group-provisioner: the worker and convirza-sim in one small, non-root image.
#
#   docker build -t group-provisioner:0.3.0 \
#     --build-arg REVISION="$(git rev-parse HEAD)" .
#   docker run --rm group-provisioner --help
#   docker run --rm --entrypoint convirza-sim group-provisioner --listen 0.0.0.0:8080
#
# No secrets are baked in: configuration comes from PROVISIONER__* variables or a TOML
# file mounted at runtime (--config).

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin benches tests/it \
 && echo 'fn main() {}' > src/bin/group-provisioner.rs \
 && echo 'fn main() {}' > src/bin/convirza-sim.rs \
 && echo '' > src/lib.rs && echo 'fn main() {}' > benches/throughput.rs && echo '' > tests/it/main.rs \
 && cargo build --release --locked --bins \
 && rm -rf src benches tests
COPY . .
# The image has no .git: the commit comes in as a build argument (build.rs reads it).
ARG REVISION=unknown
RUN touch src/lib.rs src/bin/*.rs \
 && GP_BUILD_COMMIT="$REVISION" cargo build --release --locked --bins

FROM debian:bookworm-slim
ARG REVISION=unknown
# Keep in step with Cargo.toml's version (a test checks it).
LABEL org.opencontainers.image.title="group-provisioner" \
      org.opencontainers.image.version="0.3.0" \
      org.opencontainers.image.revision="$REVISION" \
      org.opencontainers.image.source="https://github.com/example/group-provisioner"
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin provisioner
COPY --from=build /src/target/release/group-provisioner /src/target/release/convirza-sim /usr/local/bin/
USER 10001:10001
# In a container the metrics/probe endpoint must be reachable from outside.
ENV PROVISIONER__METRICS__LISTEN=0.0.0.0:9464
EXPOSE 9464
# Liveness without curl: bash's /dev/tcp against /healthz. Orchestrators that probe over
# HTTP (Kubernetes) use /healthz and /readyz directly and ignore this.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9464 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q ' 200 ' <&3"]
ENTRYPOINT ["group-provisioner"]
CMD ["run"]
