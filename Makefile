GO       ?= go
BIN      := bin
PKGS     := ./...
# Tests run with the race detector; CI sets CI=true so tests that need a
# missing binary (mosquitto) fail instead of skipping.
TESTFLAGS ?= -race -count=1 -timeout 20m

.PHONY: all build run test bench bench-ingest bench-api lint fuzz clean

all: build

build:
	$(GO) build -o $(BIN)/edge ./cmd/edge

run: build
	$(BIN)/edge -config configs/edge.yaml

test:
	$(GO) vet $(PKGS)
	$(GO) test $(TESTFLAGS) $(PKGS)

lint:
	$(GO) vet $(PKGS)
	@test -z "$$(gofmt -l .)" || (echo "gofmt needed:"; gofmt -l .; exit 1)

bench: bench-ingest
	$(GO) test -run '^$$' -bench . -benchmem ./pkg/store/ ./pkg/api/

bench-ingest:
	$(GO) run ./cmd/edgebench

bench-api:
	$(GO) run ./cmd/apibench

fuzz:
	$(GO) test -run '^$$' -fuzz FuzzDecode -fuzztime 60s ./pkg/ingest/

clean:
	rm -rf $(BIN)

# --- cloud-sync ---
.PHONY: build-cloud run-cloud test-cloud bench-cloud
build-cloud:
	$(GO) build -o $(BIN)/cloud-sync ./cmd/cloud-sync

run-cloud: build-cloud
	$(BIN)/cloud-sync -config configs/cloud-sync.yaml

test-cloud:
	$(GO) vet ./pkg/cloud/... ./pkg/wire/ ./cmd/cloud-sync ./cmd/cloudbench
	$(GO) test $(TESTFLAGS) ./pkg/cloud/... ./pkg/wire/ && $(GO) test $(TESTFLAGS) -run Cloud ./test/e2e/

# One JSON line: committed readings/s for batches of 1, 100 and 5000 pushed
# into a 3-process cluster, leader RSS, and failover time.
bench-cloud: build-cloud
	$(GO) run ./cmd/cloudbench -bin $(BIN)/cloud-sync
# --- end cloud-sync ---

# --- operations: container images, KubeEdge manifests, demo ---
.PHONY: image image-edge image-cloud-sync docker-check test-deploy demo
DOCKER       ?= docker
IMAGE_PREFIX ?= outpost/
IMAGE_TAG    ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)

# Multi-stage, static (CGO_ENABLED=0), non-root images from deploy/docker/.
# Needs a running container engine (DOCKER=podman works too); not part of
# `make test`.
image: image-edge image-cloud-sync

image-edge image-cloud-sync: image-%: docker-check
	$(DOCKER) build -f deploy/docker/$*.Dockerfile --build-arg VERSION=$(IMAGE_TAG) \
		-t $(IMAGE_PREFIX)$*:$(IMAGE_TAG) -t $(IMAGE_PREFIX)$*:latest .

docker-check:
	@command -v $(DOCKER) >/dev/null 2>&1 || { echo "make image: '$(DOCKER)' is not installed (set DOCKER=podman to use podman)" >&2; exit 1; }
	@$(DOCKER) info >/dev/null 2>&1 || { echo "make image: no container engine answers ('$(DOCKER) info' failed): start the Docker daemon, or build elsewhere" >&2; exit 1; }

# Strict parse of deploy/kubeedge against the Kubernetes API types, and its
# ports, probes, flags and paths against the binaries.
test-deploy:
	$(GO) test $(TESTFLAGS) ./deploy/...

# A local topology on loopback: 3 cloud-sync nodes, edges east and west, a
# device simulator. Ctrl-C stops it. See docs/demo.md.
demo:
	$(GO) run ./cmd/demo
# --- end operations ---

# --- sync ---
.PHONY: bench-sync test-sync
# One JSON line: a 1,000,000-reading backlog built on an offline edge, then
# the seconds until a 3-node cloud committed all of it, readings/s, live-sync
# latency (publish → committed in the cloud) p50/p99, peak RSS of edge and
# cloud. Pass SYNCBENCH_ARGS=-readings=100000 for a quick run.
bench-sync:
	$(GO) build -o $(BIN)/edge ./cmd/edge
	$(GO) build -o $(BIN)/cloud-sync ./cmd/cloud-sync
	$(GO) run ./cmd/syncbench -bin $(BIN) $(SYNCBENCH_ARGS)

# Edge↔cloud reconciliation: syncer, store sync state, and the fault tests.
test-sync:
	$(GO) test $(TESTFLAGS) ./pkg/syncer/ ./pkg/shadow/ ./pkg/store/ ./pkg/cloud/... ./pkg/wire/
	$(GO) test $(TESTFLAGS) -run 'TestSync' ./test/e2e/
# --- end sync ---
