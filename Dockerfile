# One image for every party: secdfd-dealer, secdfd-server, secdfd-client and secdfd, installed in
# the virtual environment /opt/secdfd (on PATH) and run as the unprivileged user secdfd (uid 10001).
#
# Build arguments (the defaults build from the public registries):
#   BASE_IMAGE   a Debian-like image with Python 3.11 and its venv module: python:3.11-slim, or one
#                made from Debian's archive (scripts/docker_offline.sh base)
#   TORCH_INDEX  the index torch==2.13.0 comes from: the PyTorch CPU index (no CUDA libraries);
#                docker-compose.gpu.yml passes a CUDA one
#   PIP_INDEX    the index of every other package
#   WHEELS       a folder inside the build context holding every wheel (scripts/docker_offline.sh
#                wheels DIR): install from it alone, no index at all (air-gapped sites)
# Only /opt/secdfd leaves the build stage: no sources, wheels or caches in the image.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX=https://pypi.org/simple
ARG WHEELS=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/secdfd/bin:$PATH
RUN python3 -m venv /opt/secdfd
WORKDIR /src
COPY . .
# torch first and pinned, so the project's unpinned `torch` never pulls another build
RUN if [ -z "$WHEELS" ]; then \
      pip install torch==2.13.0 --index-url "$TORCH_INDEX" && \
      pip install . --index-url "$PIP_INDEX"; \
    else \
      pip install torch==2.13.0 --no-index --find-links "$WHEELS" && \
      pip install . --no-index --find-links "$WHEELS"; \
    fi
# torch's C++ headers and C++ test programs serve only to compile extensions and to test torch itself
RUN torch=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/torch \
    && rm -rf "$torch/include" "$torch"/bin/test_* "$torch"/bin/*Test "$torch"/bin/protoc*

FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 PATH=/opt/secdfd/bin:$PATH
COPY --from=build /opt/secdfd /opt/secdfd
# /state/*: mount points of the ledger volumes. A new named volume takes the mode of its mount
# point, so they are writable by whichever uid the services run as (SECDFD_UID in compose).
RUN useradd --system --uid 10001 --user-group --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin secdfd \
    && mkdir -p /deploy /keys /shares /state/dealer /state/server_a /state/server_b \
    && chmod 1777 /state/dealer /state/server_a /state/server_b \
    && chown secdfd:secdfd /deploy
USER 10001:10001
WORKDIR /deploy

# dealer 7300, server_a 7301 (clients) and 7310 (server_b), server_b 7302
EXPOSE 7300 7301 7302 7310
CMD ["secdfd", "--help"]
