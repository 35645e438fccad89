FROM python:3.12-slim
WORKDIR /app
COPY . .
RUN pip install --no-cache-dir -e ".[examples]"
ENV MCPO_CONFIG=/app/examples/services.yaml
CMD ["mcp-orchestrator", "--help"]
