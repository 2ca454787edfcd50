GO       ?= go
BIN      := bin
PKGS     := ./...
# Tests run with the race detector; CI sets CI=true so tests that need a
# missing binary (mosquitto) fail instead of skipping.
TESTFLAGS ?= -race -count=1 -timeout 20m

.PHONY: all build run test bench bench-ingest lint fuzz clean

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

fuzz:
	$(GO) test -run '^$$' -fuzz FuzzDecode -fuzztime 60s ./pkg/ingest/

clean:
	rm -rf $(BIN)
