# One image for every service: `clms serve intake|referral|notifications|analytics`.
# Build stage compiles wheels; the final stage has no compilers and runs as a non-root user.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY clms ./clms
RUN python -m venv /opt/clms && /opt/clms/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/clms/bin/pip install --no-cache-dir .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home /home/clms --create-home clms
COPY --from=build /opt/clms /opt/clms
ENV PATH=/opt/clms/bin:$PATH PYTHONUNBUFFERED=1 CLMS_HOST=0.0.0.0 LOG_JSON=true
USER clms
WORKDIR /home/clms
ENTRYPOINT ["clms", "serve"]
CMD ["intake"]
