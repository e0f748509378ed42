# syntax=docker/dockerfile:1
#
# loraplex container images.
#
#   docker build -t loraplex:0.1.0 .                          # CPU image (the default target: the last stage)
#   docker build --target cuda -t loraplex:0.1.0-cuda .       # CUDA image
#
# Both build the native addon inside the image (cmake-js), run as the non-root user 10001 and start
# `loraplex serve`, configured through LORAPLEX_* environment variables (every flag has one).
# Mount points: the base model read-only under /models (LORAPLEX_MODEL=/models/NAME), adapters at
# /adapters (LORAPLEX_ADAPTER_DIR; uploads are written there). With no LORAPLEX_MODEL the bundled
# demo model is generated on first start into LORAPLEX_CACHE_DIR. See deploy/README.md.
#
# test/deploy/dockerfile.test.ts lints this file: keep every source it copies in the repository
# and out of .dockerignore.

ARG NODE_IMAGE=node:20-bookworm
ARG NODE_SLIM_IMAGE=node:20-bookworm-slim
ARG CUDA_VERSION=12.6.3
ARG CUDA_OS=ubuntu24.04
# GPU code compiled into the CUDA image: machine code for Ampere (80, 86), Ada (89) and Hopper (90),
# plus PTX for 90 so that newer GPUs can JIT-compile it.
ARG CUDA_ARCHITECTURES="80-real;86-real;89-real;90"

# ---- sources: exactly what the build needs, shared by the CPU and CUDA builds ------------------
FROM scratch AS sources
COPY package.json package-lock.json tsconfig.json CMakeLists.txt /src/
COPY addon/ /src/addon/
COPY kernels/ /src/kernels/
COPY server/ /src/server/
COPY bin/ /src/bin/
# CMakeLists.txt also declares the kernel tests and benchmark helpers (and, with LORAPLEX_CUDA=ON,
# the CUDA test programs): configure needs their sources even though only the addon is built.
COPY test/native/ /src/test/native/
COPY test/cuda/ /src/test/cuda/
COPY bench/native/ /src/bench/native/

# ---- node: the Node.js runtime, copied into the CUDA stages ------------------------------------
FROM ${NODE_SLIM_IMAGE} AS node

# ---- build: CPU addon + compiled TypeScript + production node_modules --------------------------
FROM ${NODE_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY --from=sources /src/package.json /src/package-lock.json ./
# Dependencies first (cached while only sources change); the addon is built below, not by npm.
RUN npm ci --ignore-scripts --no-audit --no-fund
COPY --from=sources /src/ ./
RUN npx cmake-js compile --CDCMAKE_BUILD_TYPE=Release --target loraplex_native \
 && npx tsc -p tsconfig.json \
 && npm prune --omit=dev --ignore-scripts --no-audit --no-fund

# ---- build-cuda: the same with the CUDA backend (LORAPLEX_CUDA=ON) -----------------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-${CUDA_OS} AS build-cuda
ARG CUDA_ARCHITECTURES
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake g++ make \
 && rm -rf /var/lib/apt/lists/*
COPY --from=node /usr/local/bin/node /usr/local/bin/node
COPY --from=node /usr/local/lib/node_modules/npm /usr/local/lib/node_modules/npm
RUN ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm \
 && ln -s ../lib/node_modules/npm/bin/npx-cli.js /usr/local/bin/npx
WORKDIR /src
COPY --from=sources /src/package.json /src/package-lock.json ./
RUN npm ci --ignore-scripts --no-audit --no-fund
COPY --from=sources /src/ ./
RUN npx cmake-js compile --CDCMAKE_BUILD_TYPE=Release --CDLORAPLEX_CUDA=ON \
      "--CDCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}" --target loraplex_native \
 && npx tsc -p tsconfig.json \
 && npm prune --omit=dev --ignore-scripts --no-audit --no-fund

# ---- cuda: runtime image on the CUDA runtime base (docker build --target cuda) -----------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${CUDA_OS} AS cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 loraplex \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin loraplex \
 && mkdir -p /models /adapters /var/cache/loraplex \
 && chown 10001:10001 /adapters /var/cache/loraplex
COPY --from=node /usr/local/bin/node /usr/local/bin/node
WORKDIR /app
COPY --from=build-cuda /src/package.json ./
COPY --from=build-cuda /src/node_modules/ node_modules/
COPY --from=build-cuda /src/dist/ dist/
COPY --from=build-cuda /src/server/ui/ server/ui/
COPY --from=build-cuda /src/server/engine/grammar-worker.mjs server/engine/
COPY --from=build-cuda /src/bin/ bin/
COPY --from=build-cuda /src/build/Release/loraplex_native.node build/Release/
RUN ln -s /app/bin/loraplex.js /usr/local/bin/loraplex
LABEL org.opencontainers.image.title="loraplex (CUDA)" \
      org.opencontainers.image.description="Multi-LoRA LLM inference server, CUDA backend" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.loraplex.models-dir="/models" \
      io.loraplex.adapters-dir="/adapters"
ENV NODE_ENV=production \
    LORAPLEX_HOST=0.0.0.0 \
    LORAPLEX_PORT=8000 \
    LORAPLEX_ADAPTER_DIR=/adapters \
    LORAPLEX_CACHE_DIR=/var/cache/loraplex
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:' + (process.env.LORAPLEX_PORT || 8000) + '/health').then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
ENTRYPOINT ["loraplex", "serve"]

# ---- cpu: runtime image (the default target, so it stays the last stage) -----------------------
FROM ${NODE_SLIM_IMAGE} AS cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 loraplex \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin loraplex \
 && mkdir -p /models /adapters /var/cache/loraplex \
 && chown 10001:10001 /adapters /var/cache/loraplex
WORKDIR /app
COPY --from=build /src/package.json ./
COPY --from=build /src/node_modules/ node_modules/
COPY --from=build /src/dist/ dist/
COPY --from=build /src/server/ui/ server/ui/
COPY --from=build /src/server/engine/grammar-worker.mjs server/engine/
COPY --from=build /src/bin/ bin/
COPY --from=build /src/build/Release/loraplex_native.node build/Release/
RUN ln -s /app/bin/loraplex.js /usr/local/bin/loraplex
LABEL org.opencontainers.image.title="loraplex" \
      org.opencontainers.image.description="Multi-LoRA LLM inference server, CPU backend" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.loraplex.models-dir="/models" \
      io.loraplex.adapters-dir="/adapters"
ENV NODE_ENV=production \
    LORAPLEX_HOST=0.0.0.0 \
    LORAPLEX_PORT=8000 \
    LORAPLEX_ADAPTER_DIR=/adapters \
    LORAPLEX_CACHE_DIR=/var/cache/loraplex
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:' + (process.env.LORAPLEX_PORT || 8000) + '/health').then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
ENTRYPOINT ["loraplex", "serve"]
