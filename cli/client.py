"""Finding and calling the running daemon's local API."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from knexa.node.config import NodeConfig
from knexa.node.paths import STATE_FILE, TOKEN_FILE


class ApiError(Exception):
    """The daemon could not be reached or refused the request; the message is for the user."""


def _api_url(config: NodeConfig, override: str | None) -> str:
    if override:
        return override.rstrip("/")
    try:
        state = json.loads((config.data_dir / STATE_FILE).read_text())
        if state.get("api"):
            return str(state["api"]).rstrip("/")
    except (OSError, ValueError):
        pass
    return f"http://{config.api_host}:{config.api_port}"


def _token(data_dir: Path, override: str | None) -> str | None:
    if override:
        return override
    if os.environ.get("KNEXA_API_TOKEN"):
        return os.environ["KNEXA_API_TOKEN"]
    try:
        return (data_dir / TOKEN_FILE).read_text().strip()
    except OSError:
        return None


class ApiClient:
    def __init__(self, config: NodeConfig, api: str | None = None, token: str | None = None) -> None:
        self.url = _api_url(config, api)
        self.token = _token(config.data_dir, token)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def stream_chat(self, body: dict[str, Any], timeout_s: float = 600.0) -> Iterator[dict[str, Any]]:
        """POST a streaming chat completion; yields each server-sent event's JSON."""
        try:
            with httpx.stream(
                "POST", self.url + "/v1/chat/completions", json={**body, "stream": True},
                headers=self._headers(), timeout=timeout_s,
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ApiError(_detail(response))
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[len("data: "):])
                    if "error" in event:
                        raise ApiError(event["error"].get("message", "generation failed"))
                    yield event
        except httpx.ConnectError:
            raise ApiError(f"knexa-node is not running (no daemon answers at {self.url})") from None
        except httpx.TimeoutException:
            raise ApiError(f"the daemon at {self.url} did not answer within {timeout_s:.0f}s") from None

    def get(self, path: str, timeout_s: float = 5.0) -> Any:
        return self.request("GET", path, timeout_s)

    def request(self, method: str, path: str, timeout_s: float, body: dict[str, Any] | None = None) -> Any:
        """One call to the local API: the JSON answer, or ApiError with the reason."""
        try:
            response = httpx.request(method, self.url + path, json=body, headers=self._headers(), timeout=timeout_s)
        except httpx.ConnectError:
            raise ApiError(f"knexa-node is not running (no daemon answers at {self.url})") from None
        except httpx.TimeoutException:
            raise ApiError(f"the daemon at {self.url} did not answer within {timeout_s:.0f}s") from None
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach the daemon at {self.url}: {exc}") from None
        if response.status_code == 401:
            raise ApiError(
                f"the daemon at {self.url} refused the API token "
                "(check --token, KNEXA_API_TOKEN or the data dir's api.token)"
            )
        if response.status_code >= 400:
            raise ApiError(_detail(response))
        if path == "/metrics":
            return response.text
        return response.json()


def _detail(response: httpx.Response) -> str:
    if response.status_code == 401:
        return "the daemon refused the API token (check --token, KNEXA_API_TOKEN or the data dir's api.token)"
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    if isinstance(detail, list):  # request validation errors
        detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
    return f"the daemon answered {response.status_code}: {str(detail)[:300]}"
