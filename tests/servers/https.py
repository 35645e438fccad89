"""The testing server (testing.py) over Streamable HTTP behind TLS: uvicorn with a certificate and its key."""

from __future__ import annotations

import argparse

import uvicorn
from testing import server

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True, help="PEM: the server certificate and its chain")
    parser.add_argument("--key", required=True, help="PEM: its private key")
    options = parser.parse_args()
    uvicorn.run(server.streamable_http_app(), host="127.0.0.1", port=options.port, log_level="warning",
                ssl_certfile=options.cert, ssl_keyfile=options.key)  # fmt: skip
