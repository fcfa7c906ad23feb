# The extproc server (and the bundled mock upstream) as a container image.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY extproc ./extproc
RUN pip install --no-cache-dir . && useradd --system extproc
USER extproc
ENV EXTPROC_GRPC_HOST=0.0.0.0 EXTPROC_ADMIN_HOST=0.0.0.0
EXPOSE 50051 9190
ENTRYPOINT ["extproc"]
CMD ["serve"]
