# The Spendgate extproc service (the ext_proc gRPC filter and the admin CLI).
#
#   docker build -t spendgate-extproc .
#   docker run --rm spendgate-extproc master-key generate
#
# docker-compose.yml builds this image and runs it next to Postgres and the official Envoy image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SPENDGATE_HOME=/var/lib/spendgate

# Every dependency ships manylinux wheels, so no compiler is needed. The sources are only needed
# while pip builds the package; the installed copy lives in site-packages.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY extproc/ extproc/
RUN pip install . && rm -rf /src

# A fixed non-root uid, so volume ownership is predictable across rebuilds.
RUN groupadd --system --gid 10001 spendgate \
    && useradd --system --uid 10001 --gid spendgate --home-dir /var/lib/spendgate --no-create-home \
       --shell /usr/sbin/nologin spendgate \
    && mkdir -p /var/lib/spendgate \
    && chown spendgate:spendgate /var/lib/spendgate \
    && chmod 0700 /var/lib/spendgate

# SPENDGATE_HOME: the usage spool (spool.jsonl) lives here. Keep it on a volume so records spooled
# during a Postgres outage survive a container restart.
VOLUME ["/var/lib/spendgate"]
WORKDIR /app
USER spendgate
EXPOSE 50051

ENTRYPOINT ["spendgate"]
# The price table ships inside the package. For policies, mount a directory at /app/policies:
# `serve` loads ./policies when there is one, and its pricing.yaml, if any, replaces the shipped table.
CMD ["serve", "--listen", "0.0.0.0:50051"]
