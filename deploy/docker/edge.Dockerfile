# syntax=docker/dockerfile:1
# Image of the Outpost edge gateway: a static binary on distroless, non-root.
# Build from the repository root: make image (or
#   docker build -f deploy/docker/edge.Dockerfile -t outpost/edge .)

FROM --platform=$BUILDPLATFORM golang:1.26 AS build
ARG TARGETOS=linux
ARG TARGETARCH
ARG VERSION=dev
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -ldflags="-s -w -X github.com/outpost-edge/outpost/pkg/obs.Version=$VERSION" \
       -o /out/edge ./cmd/edge \
 && mkdir -p /out/data

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/edge /usr/local/bin/edge
# Owned by the runtime user, so a fresh volume mounted here is writable.
COPY --from=build --chown=65532:65532 /out/data /var/lib/outpost
COPY configs/ /etc/outpost/config/
COPY policies/*.rego /etc/outpost/policies/
# Distroless's nonroot user; the data volume must be writable by it.
USER 65532:65532
VOLUME ["/var/lib/outpost"]
EXPOSE 8080 1883
ENTRYPOINT ["/usr/local/bin/edge"]
CMD ["-config", "/etc/outpost/config/edge.yaml", "-data", "/var/lib/outpost", "-policies", "/etc/outpost/policies"]
