FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY streams ./streams
COPY models ./models
COPY selection ./selection
COPY schemas ./schemas
RUN pip install --no-cache-dir ".[server]"
USER nobody
ENTRYPOINT []
CMD ["clipstream", "--help"]
