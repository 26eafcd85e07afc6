# Multi-stage build of every credits binary. protoc comes from the protoc-bin-vendored
# crate and SQL is checked against the committed .sqlx/ cache, so the build needs neither
# a system protoc nor a database.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
 && mkdir /out \
 && find target/release -maxdepth 1 -type f -executable -name 'credits*' -exec cp {} /out/ \;

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 credits
COPY --from=build /out/ /usr/local/bin/
USER credits
