# opsagent — build, test and demo entry points.
# `make test` is what CI runs (.ci/run); it needs only Go: the tools it uses
# are fetched through the Go module proxy into .tools/.

GO          ?= go
VERSION     ?= $(shell cat VERSION)
COMMIT      ?= $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
PKG         := github.com/visualops/opsagent
LDFLAGS     := -s -w -X $(PKG)/internal/version.Version=$(VERSION) -X $(PKG)/internal/version.Commit=$(COMMIT)
TOOLS       := $(CURDIR)/.tools/bin
STATICCHECK_VERSION := v0.8.2
STATICCHECK := $(TOOLS)/staticcheck-$(STATICCHECK_VERSION)
VERSITYGW_VERSION := v1.8.0
VERSITYGW   := $(TOOLS)/versitygw-$(VERSITYGW_VERSION)
FUZZTIME    ?= 30s
BENCHTIME   ?= 1x

export CGO_ENABLED ?= 0
# Everything is compiled -trimpath, as release builds are: vet, staticcheck,
# the tests and the binaries the tests build then share one compiled copy
# of each package (from a cold cache this saves a compile of the tree).
export GOFLAGS := $(strip $(GOFLAGS) -trimpath)

.PHONY: all build test fmt fmt-check vet staticcheck unit bench fuzz demo release tools clean soak

all: build

## build: static binary bin/opsagent with the version stamped in
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/opsagent ./cmd/opsagent

## test: everything CI checks
test: fmt-check vet staticcheck unit

fmt:
	gofmt -w $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go' -not -path './.tools/*')

fmt-check:
	@out=$$(gofmt -l $$(find . -name '*.go' -not -path './.tools/*' -not -path './.cache/*')); \
	if [ -n "$$out" ]; then echo "gofmt needed on:"; echo "$$out"; echo "run: make fmt"; exit 1; fi

vet:
	$(GO) vet ./...

$(STATICCHECK):
	@mkdir -p $(TOOLS)
	GOBIN=$(TOOLS) CGO_ENABLED=0 $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)
	mv $(TOOLS)/staticcheck $(STATICCHECK)

staticcheck: $(STATICCHECK)
	$(STATICCHECK) ./...

## unit: all tests with the race detector; fuzz targets run their seed
## corpora as ordinary tests here. release/, internal/dist, e2e and
## agent/native run without it: the first three gzip release binaries and
## run scrypt key derivation, which the race detector slows twenty-fold
## (e2e took 14.5 minutes under it, 2 without), and it would watch only
## e2e's harness, not the opsagent processes it starts; agent/native's
## tests spend their time in the real package managers, shadow tools and
## VCS they drive in Debian roots (a module runs one state at a time; the
## concurrency around it, the round engine, is raced in agent/rounds).
## The Debian root those tests share is built once first (debootstrap,
## cached in ~/.cache/opsagent-test), so no package's timeout pays for it.
## versitygw (a real S3 server) is built for the publish tests and
## common.archive's s3://.
NORACE      = /release$$|/internal/dist$$|/e2e$$|/agent/native$$
RACE_PKGS   = $$($(GO) list ./... | grep -Ev '$(NORACE)')
NORACE_PKGS = $$($(GO) list ./... | grep -E '$(NORACE)')
unit: $(VERSITYGW)
	$(GO) test -count=1 -timeout 20m -run '^TestDebianRoot$$' ./internal/system/
	CGO_ENABLED=1 OPSAGENT_VERSITYGW=$(VERSITYGW) $(GO) test -race -count=1 -timeout 12m $(RACE_PKGS)
	OPSAGENT_VERSITYGW=$(VERSITYGW) $(GO) test -count=1 -timeout 20m $(NORACE_PKGS)

$(VERSITYGW):
	@mkdir -p $(TOOLS)
	GOBIN=$(TOOLS) CGO_ENABLED=0 $(GO) install github.com/versity/versitygw/cmd/versitygw@$(VERSITYGW_VERSION)
	mv $(TOOLS)/versitygw $(VERSITYGW)

## bench: benchmarks, figures printed (never asserted); one package at a
## time (-p 1) so that packages do not skew each other's timings. Some of
## them: BENCH='BenchmarkFleet(Fanout|Ingest|WaitRelay|Failover)' BENCHPKGS=./e2e/
## (the backend replicas on NATS beside the single-process backend).
BENCH       ?= .
BENCHPKGS   ?= ./...
bench:
	$(GO) test -p 1 -run '^$$' -bench '$(BENCH)' -benchmem -benchtime $(BENCHTIME) -timeout 30m $(BENCHPKGS)

## fuzz: run every fuzz target for FUZZTIME each
fuzz:
	@for pkg in $$($(GO) list ./...); do \
	  for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
	    echo "== $$pkg $$f"; $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
	  done; \
	done

## release: build dist/opsagent.tgz (signed when KEY is set); publish when BUCKET is set
release:
	$(GO) run ./cmd/opsagent release build --version $(VERSION) $(if $(KEY),--key $(KEY))
	$(if $(BUCKET),$(GO) run ./cmd/opsagent release publish --bucket $(BUCKET) --version $(VERSION) $(if $(ENDPOINT),--endpoint $(ENDPOINT)) $(if $(PREFIX),--prefix $(PREFIX)))

## demo: the whole story locally: publish releases to a local S3, boot an
## instance from its userdata, rounds, self-update, rollback, re-run
demo: build $(VERSITYGW)
	$(GO) run ./scripts/demo -bin bin/opsagent -versitygw $(VERSITYGW)

clean:
	rm -rf bin dist .tools

## soak: one agent for an hour (SOAKFLAGS='-duration 10m -interval 30s -keep'):
## random backend kill -9, a self-update, RSS/threads/fds/StateLogs every minute,
## agent_seq checked exactly once at the end; exits 1 on a problem (not part of test)
soak: build
	$(GO) run ./scripts/soak -bin bin/opsagent $(SOAKFLAGS)
