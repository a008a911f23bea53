# kms-server image. Build: docker build -t backup-kms .
# Run (TLS is required off loopback; mount the root key, policy and certificates):
#   docker run -p 50051:50051 -v kms-data:/var/lib/kms -v ./secrets:/etc/kms:ro backup-kms
# expecting /etc/kms/root.key, /etc/kms/policy.toml, /etc/kms/tls/server.{crt,key}
# (and /etc/kms/tls/client-ca.crt for mutual TLS, set KMS_TLS_CLIENT_CA).

FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/kms
COPY pyproject.toml README.md ./
COPY kms ./kms
COPY kms_audit ./kms_audit
COPY server ./server
COPY client ./client
RUN /opt/kms/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/kms/bin/pip install --no-cache-dir .

FROM python:3.11-slim
RUN groupadd --system --gid 10001 kms \
 && useradd --system --uid 10001 --gid kms --home-dir /var/lib/kms --shell /usr/sbin/nologin kms \
 && install -d -o kms -g kms -m 0700 /var/lib/kms
COPY --from=build /opt/kms /opt/kms
ENV PATH=/opt/kms/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    KMS_LISTEN=0.0.0.0:50051 \
    KMS_DATA_DIR=/var/lib/kms \
    KMS_ROOT_KEY_FILE=/etc/kms/root.key \
    KMS_POLICY_FILE=/etc/kms/policy.toml \
    KMS_TLS_CERT=/etc/kms/tls/server.crt \
    KMS_TLS_KEY=/etc/kms/tls/server.key \
    KMS_HEALTH_LISTEN=127.0.0.1:50052
USER kms
WORKDIR /var/lib/kms
VOLUME ["/var/lib/kms"]
EXPOSE 50051
# Asks grpc.health.v1 on the loopback-only health port, which needs no client certificate.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-m", "server.healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["kms-server"]
