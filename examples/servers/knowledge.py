"""Example knowledge MCP servers for the fan-out workflow: research, docs and analytics.

One file, three servers: `python knowledge.py research|docs|analytics [--http PORT]`.
"""

from __future__ import annotations

import argparse
import hashlib
from typing import Any

from mcp.server.mcpserver import MCPServer


def _score(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:4], 16) % 100


def research_server() -> MCPServer:
    server = MCPServer("research")

    @server.tool()
    def search(query: str, limit: int = 3) -> dict[str, Any]:
        """Find sources about a topic."""
        sources = [f"{query} — source {i + 1}" for i in range(limit)]
        return {"query": query, "sources": sources, "summary": f"{len(sources)} sources on {query}"}

    return server


def docs_server() -> MCPServer:
    server = MCPServer("docs")

    @server.tool()
    def lookup(library: str, topic: str = "getting started") -> dict[str, Any]:
        """Look up a library's documentation on a topic."""
        return {"library": library, "topic": topic, "pages": [f"{library}/{topic.replace(' ', '-')}"]}

    return server


def analytics_server() -> MCPServer:
    server = MCPServer("analytics")

    @server.tool()
    def trend(subject: str) -> dict[str, Any]:
        """A popularity score for a subject."""
        return {"subject": subject, "score": _score(subject)}

    @server.tool()
    def combine(research: dict[str, Any], docs: dict[str, Any], trend: dict[str, Any]) -> dict[str, Any]:
        """Fan-in: merge the three branches into one report."""
        return {
            "topic": research["query"],
            "sources": len(research["sources"]),
            "docs": docs["pages"],
            "score": trend["score"],
        }

    return server


SERVERS = {"research": research_server, "docs": docs_server, "analytics": analytics_server}

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("name", choices=sorted(SERVERS))
    parser.add_argument("--http", type=int, metavar="PORT", help="serve Streamable HTTP on this port")
    options = parser.parse_args()
    server = SERVERS[options.name]()
    if options.http:
        server.run("streamable-http", host="127.0.0.1", port=options.http)
    else:
        server.run()
