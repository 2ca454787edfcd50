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
