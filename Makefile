# Two entry points: `make demo` and `make test`. Both install whatever is missing
# (Debian packages, a venv with the project) and are idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PACKAGES := fuse3 libfuse3-dev pkg-config containerd runc docker-registry skopeo umoci busybox-static debootstrap
BENCH_APT_PACKAGES := s3fs rclone
PROTO_PACKAGE := golang-github-containerd-containerd-dev
PROTOS := $(VENV)/share/containerd-api

.PHONY: demo demo-coldstart test install system-deps bench clean

demo: install
	$(PY) -m p2pfs.demo

# The whole cold-start chain once (a few minutes; the first run also builds the replica
# image from Debian and the local torch wheel, cached under /var/tmp/p2pfs-bench-images):
# a request at zero replicas through p2pfs-scaler's containerd actuator, baseline beside
# p2pfs, with every stage's seconds. Results go to a temp file, not bench/.
demo-coldstart: install
	$(PY) bench/bench_coldstart.py --rounds 1 --json $${TMPDIR:-/tmp}/p2pfs-demo-coldstart.json

test: install
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

install: system-deps $(STAMP) $(PROTOS)/.unpacked

# containerd's .proto files (tests/test_snapshotter_proto.py checks snapshotter/_proto.py
# against them), unpacked from Debian's golang-github-containerd-containerd-dev rather than
# installed with its 113 Go source dependencies. Where the package cannot be had, the
# install goes on and those tests skip with the reason.
$(PROTOS)/.unpacked: | $(STAMP)
	@d=$$(mktemp -d); \
	( cd $$d && { apt-get download -qq $(PROTO_PACKAGE) 2>/dev/null || \
	  { apt-get update -qq && apt-get download -qq $(PROTO_PACKAGE); }; } && \
	  dpkg-deb -x $(PROTO_PACKAGE)_*.deb x ) && \
	rm -rf $(PROTOS) && mkdir -p $(PROTOS) && \
	cp -r $$d/x/usr/share/gocode/src/github.com/containerd/containerd/api/. $(PROTOS)/ && \
	touch $@ || echo "containerd's .proto files not unpacked: tests/test_snapshotter_proto.py will skip"; \
	rm -rf $$d

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

bench: install
	@missing=""; for p in $(BENCH_APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) bench/bench_p2pfs.py

clean:
	rm -rf $(VENV) build *.egg-info
