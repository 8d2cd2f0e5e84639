# One image for every service: `clms serve intake|referral|notifications|analytics|workspace`
# (each service runs its API and its worker in one process; the workspace serves the pages).
#
# Stage 1 builds a virtual environment from the pinned lock file (regenerate it with `make lock`);
# compilers exist only here, for any dependency without a wheel. Stage 2 copies the finished
# environment into a clean slim image and runs it as an unprivileged user.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/clms
WORKDIR /src
# Dependencies first (their own layer, rebuilt only when the lock changes) ...
COPY requirements.lock ./
RUN /opt/clms/bin/pip install --no-deps -r requirements.lock
# ... then the project itself, without resolving anything again.
COPY pyproject.toml ./
COPY shared ./shared
COPY services ./services
COPY clms ./clms
RUN /opt/clms/bin/pip install --no-deps . \
 && /opt/clms/bin/pip check \
 && /opt/clms/bin/python -c "import services, shared, clms.cli"

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="clms-referral-services" \
      org.opencontainers.image.description="CLMS referral services (intake, referral, notifications, analytics, workspace)"
RUN groupadd --system --gid 10001 clms \
 && useradd --system --uid 10001 --gid clms --home-dir /home/clms --create-home --shell /usr/sbin/nologin clms
COPY --from=build /opt/clms /opt/clms
ENV PATH=/opt/clms/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CLMS_HOST=0.0.0.0 \
    CLMS_ENV=production \
    LOG_JSON=true \
    CLMS_DATA_DIR=/tmp/clms
USER 10001:10001
WORKDIR /home/clms
EXPOSE 8001 8002 8003 8004 8005
ENTRYPOINT ["clms", "serve"]
CMD ["intake"]
