# One image for every party: secdfd-dealer, secdfd-server, secdfd-client and secdfd.
# torch comes first from the PyTorch CPU index (no CUDA libraries); docker-compose.gpu.yml
# builds with TORCH_INDEX pointing at a CUDA index instead.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install torch==2.13.0 --index-url "${TORCH_INDEX}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY common ./common
COPY dealer ./dealer
COPY server_a ./server_a
COPY server_b ./server_b
COPY client ./client
RUN pip install . && mkdir -p /state /keys /shares

# dealer 7300, server_a 7301 (clients) and 7310 (server_b), server_b 7302
EXPOSE 7300 7301 7302 7310
CMD ["secdfd", "--help"]
