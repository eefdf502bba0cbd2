# syntax=docker/dockerfile:1
# The image the Helm chart runs (values.yaml: image.repository ghcr.io/expertmesh/expertmesh, tag =
# the chart's appVersion): Ray on CUDA with Python 3.12, PyTorch, expertmesh and its dependencies,
# and the small demo model at /opt/expertmesh/models/demo-qwen3-moe-v3 (the chart's default model).
#
#   docker build -t ghcr.io/expertmesh/expertmesh:0.1.0 .
#   docker run --rm -p 8000:8000 ghcr.io/expertmesh/expertmesh:0.1.0          # serves the demo model
#   docker run --rm --gpus all -v /data/models:/models -p 8000:8000 -p 50051:50051 \
#       ghcr.io/expertmesh/expertmesh:0.1.0 serve /models/Qwen3-30B-A3B --host 0.0.0.0
#
# In Kubernetes, KubeRay replaces the entry point with `ray start` and Ray Serve imports
# expertmesh.gateway.serve_app:build_app from this image. RAY_VERSION must equal the chart's
# rayVersion: every Ray pod runs the same Ray.
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py312-gpu

ARG RAY_VERSION
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    EXPERTMESH_CACHE=/opt/expertmesh

USER root
RUN mkdir -p /opt/expertmesh/src /opt/expertmesh/models && chown -R ray:users /opt/expertmesh
USER ray

# The heavy dependencies first, in their own layer: a code change does not reinstall them.
RUN pip install "torch==${TORCH_VERSION}" "ray[serve]==${RAY_VERSION}"

WORKDIR /opt/expertmesh/src
COPY --chown=ray:users . .
# `pip install .` (not -e): the wheel holds real files where expertmesh/<folder> links to ../<folder>.
RUN pip install . "torch==${TORCH_VERSION}" "ray[serve]==${RAY_VERSION}" \
 && cd / && python -c "from expertmesh.model.default import DEFAULT_MODEL_NAME as name, default_model_path; \
print(default_model_path('/opt/expertmesh/models/' + name))" \
 && expertmesh --help >/dev/null

WORKDIR /home/ray
# HTTP (Ray Serve's proxy), gRPC (the gateway), Ray dashboard
EXPOSE 8000 50051 8265
ENTRYPOINT ["expertmesh"]
CMD ["serve", "--host", "0.0.0.0"]
